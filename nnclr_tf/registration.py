"""Makes every object this package saves loadable after a bare `import nnclr_tf`.

Keras finds a custom class in a `.keras` file only if its module has run
`register_keras_serializable`; it never imports a non-Keras module named in the file. So
`import nnclr_tf` must run those modules, yet `import nnclr_tf.config` (the CLI's fast path for
bad flags) must not import TensorFlow. Hence:

- Keras already imported: `register()` runs at once.
- Otherwise `install()` puts a finder on `sys.meta_path` that only watches imports: once the
  outermost import of `keras`, `tensorflow` or an `nnclr_tf` submodule has finished and Keras is
  loaded, it registers and removes itself. Waiting for the outermost import means no module is
  half-initialised when ours import each other.

`register()` also names LARS "lars", so `model.compile(optimizer="lars")` resolves.
"""

import importlib
import importlib.abc
import importlib.util
import sys

# Every module that defines a class a saved NNCLR model (or its optimizer) can contain.
MODULES = ("nnclr_tf.batch_norm", "nnclr_tf.heads", "nnclr_tf.support_set", "nnclr_tf.augment",
           "nnclr_tf.optim", "nnclr_tf.model")
_WATCHED = ("keras", "tensorflow")


def register():
    """Imports the modules in `MODULES` (each registers its classes) and names LARS 'lars'."""
    for name in MODULES:
        importlib.import_module(name)
    import keras  # pylint: disable=import-outside-toplevel
    from nnclr_tf.optim import LARS  # pylint: disable=import-outside-toplevel
    # keras.optimizers.get("lars") looks the bare name up among the registered objects.
    keras.saving.get_custom_objects().setdefault("lars", LARS)


def _watched(name):
    return name in _WATCHED or name.startswith("nnclr_tf.")


class _Loader(importlib.abc.Loader):
    """Runs the real loader; after the outermost watched import, lets the finder register."""

    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._finder.depth += 1
        try:
            self._loader.exec_module(module)
        finally:
            self._finder.depth -= 1
        if self._finder.depth == 0 and "keras" in sys.modules:
            self._finder.fire()

    def __getattr__(self, name):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.depth = 0
        self._finding = False

    def find_spec(self, fullname, path=None, target=None):
        if self._finding or not _watched(fullname):
            return None
        self._finding = True  # find the real spec with the other finders
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, self)
        return spec

    def fire(self):
        if self in sys.meta_path:
            sys.meta_path.remove(self)
            register()


def install():
    """Registers now if Keras is loaded, else once it is (see the module docstring)."""
    if "keras" in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterAfterKeras) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterKeras())
