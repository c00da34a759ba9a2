"""The experiment configs, shipped with the package: `import configs.demo`.

Each module has `get_config()` and a docstring with its exact commands; every one starts
from `configs.default` (the schema and the paper's hyper-parameters), which
`xmedjax.config_checks` validates against. The command line takes a file path:

  python -m xmedjax.main --config=configs/demo.py --workdir=runs/demo
"""
