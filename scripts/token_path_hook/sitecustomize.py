"""Python imports this at start-up in every process that has this folder on its PYTHONPATH: scripts/token_path.py
puts it there for the router and workers it starts, and names a folder in NANOCP_CALL_WINDOWS, so that each of them
records the functions it runs in the windows the script opens and closes (call_windows.py)."""

import os
from pathlib import Path

if os.environ.get("NANOCP_CALL_WINDOWS"):
    import call_windows

    call_windows.serve_signals(Path(os.environ["NANOCP_CALL_WINDOWS"]))
