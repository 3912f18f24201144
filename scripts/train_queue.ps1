# Run a queue of trainings (PowerShell mirror of train_queue.sh): each config with the trainer it names, one log
# per run, a summary table + CSV; Ctrl-C stops the current run with a resumable state and skips the rest.
#   .\scripts\train_queue.ps1 configs\night\*.toml train.max_steps=800
#   .\scripts\train_queue.ps1 --resume configs\night\*.toml train.max_steps=800
# If PowerShell refuses to run scripts, start it through scripts\train_queue.cmd: it prints the command that
# allows them. The logic lives in library/batch/queue.py (shared with train_queue.sh).
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
# UTF-8 everywhere: captions, prompts and paths, whatever the console's code page
$env:PYTHONUTF8 = "1"
[Console]::OutputEncoding = [System.Text.Encoding]::UTF8
& $Python -X utf8 (Join-Path $Root "tools/train_queue.py") @args
exit $LASTEXITCODE
