"""Built-in compression methods, one file and one dataclass each.

Importing this package imports every module in it, and each registers its method by name: a new
method is a new file here, nothing else.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
