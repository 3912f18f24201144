"""Bringing over configs users already have: sd-scripts training + dataset configs and kohya_ss GUI JSON
(tools/import_config.py). The mapping table (rules.py) is data; README's table is generated from it."""
