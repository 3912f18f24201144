# TensorBoard on a run's log folder or a queue's folder (PowerShell mirror of tensorboard.sh), localhost and
# the first free port from 6006.
#   .\scripts\tensorboard.ps1 output\quickstart\logs
#   .\scripts\tensorboard.ps1 logs\queue-20250101-230000
# If PowerShell refuses to run scripts, start it through scripts\tensorboard.cmd: it prints the command that
# allows them.
$ErrorActionPreference = "Stop"
$Root = Split-Path -Parent $PSScriptRoot
if ($env:KILN_PYTHON) {
    $Python = $env:KILN_PYTHON
} elseif ($IsLinux -or $IsMacOS) {
    $Python = Join-Path $Root ".venv/bin/python"
} else {
    $Python = Join-Path $Root ".venv\Scripts\python.exe"
}
if (-not (Test-Path $Python)) {
    [Console]::Error.WriteLine("error: $Python not found: create the venv first (README, 'On a GPU' > Windows), or set KILN_PYTHON")
    exit 2
}
$env:PYTHONUTF8 = "1"
[Console]::OutputEncoding = [System.Text.Encoding]::UTF8
& $Python -X utf8 (Join-Path $Root "tools/launch_tensorboard.py") @args
exit $LASTEXITCODE
