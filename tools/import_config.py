"""Convert an sd-scripts config (--config_file TOML + its --dataset_config) or a kohya_ss GUI JSON config into a
Kiln TOML for the matching trainer, listing every option it could not bring over and why.

    python tools/import_config.py my_lora.toml --dataset-config dataset.toml -o kiln_lora.toml
    python tools/import_config.py kohya_gui_config.json -o kiln_lora.toml
    python tools/import_config.py --mapping-table       # the option → key tables (README)
"""
from __future__ import annotations

import sys
from pathlib import Path

# tools/ is a subfolder: make `library` importable when run as `python tools/import_config.py`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.importing.tool import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
