@echo off
rem Starts train_queue.ps1. PowerShell's execution policy does not apply to .cmd files, so when it blocks
rem scripts this says so, with the exact command that allows them, instead of PowerShell's bare refusal.
setlocal
set "POLICY="
for /f "usebackq delims=" %%p in (`powershell -NoProfile -NonInteractive -Command "Get-ExecutionPolicy"`) do set "POLICY=%%p"
if /i "%POLICY%"=="Restricted" goto blocked
if /i "%POLICY%"=="AllSigned" goto blocked
if /i "%POLICY%"=="Undefined" goto blocked
powershell -NoProfile -File "%~dp0train_queue.ps1" %*
exit /b %ERRORLEVEL%
:blocked
echo PowerShell scripts are blocked on this computer (execution policy: %POLICY%). Allow them for your user with: 1>&2
echo     Set-ExecutionPolicy -Scope CurrentUser -ExecutionPolicy RemoteSigned 1>&2
echo If the files came in a downloaded zip, unblock them too: 1>&2
echo     Get-ChildItem "%~dp0*.ps1" ^| Unblock-File 1>&2
echo Or run this once without changing the policy: 1>&2
echo     powershell -ExecutionPolicy Bypass -File "%~dp0train_queue.ps1" %* 1>&2
exit /b 1
