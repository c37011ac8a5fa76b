"""`tunelab.train(...)`, `tunelab.evaluate(...)`, `tunelab.plan(...)` although those names are packages too.

Importing a submodule binds it on its parent package (`import tunelab.train.loop` sets
`tunelab.train` to the package tunelab/train/), which would hide the API function of the same
name. So these three packages are made callable: calling the package calls the API function
(tunelab.api), and everything else about the package is unchanged. Python allows a module's
class to be a ModuleType subclass for exactly this kind of use.
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    _api_name: str

    def __call__(self, *args, **kwargs):
        from tunelab import api

        return getattr(api, self._api_name)(*args, **kwargs)


def callable_package(module_name: str, api_name: str) -> None:
    """Make the package `module_name` call `tunelab.api.<api_name>` when called."""
    module = sys.modules[module_name]
    module.__class__ = _CallablePackage
    module._api_name = api_name
