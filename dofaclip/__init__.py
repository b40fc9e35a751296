"""dofaclip: DOFA-CLIP for any set of spectral bands, Mind the Modality Gap, zero-shot search on maps.

The names people use most can be imported from the package itself (`from dofaclip import create_model, open_scene`);
each is imported from its module on first use, so `import dofaclip` (and `dofaclip --help`) stays fast. Everything
else lives in its module (`dofaclip.io`, `dofaclip.model`, ...). This file is kept by hand: `nbdev-export` only
updates `__version__`."""
__version__ = "0.1.0"

_EXPORTS = {   # module -> the names it lends the package (tools/run_tests.py reads this table for tutorial freshness)
    'core': ['set_quiet', 'resolve_device'],
    'sensors': ['wavelengths', 'get_sensor'],
    'io': ['open_scene', 'sample_path', 'tile_grid', 'read_tile', 'rgb_preview'],
    'scaling': ['normalize', 'scale_pixels', 'choose_scaling'],
    'preprocess': ['image_encoder'],
    'model': ['create_model', 'get_tokenizer'],
    'weights': ['load_pretrained', 'save_pretrained'],
    'zeroshot': ['zeroshot_head', 'ZeroShotClassifier', 'extract_features'],
    'explore': ['embed_scene', 'SceneExplorer'],
    'embeddings': ['to_geoparquet', 'search_geoparquet', 'embed_collection'],
    'widget': ['ExploreMap'],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ['__version__', *_MODULE_OF]


def __getattr__(name):
    "Import `name` from its module on first use (PEP 562), then keep it here."
    if name not in _MODULE_OF: raise AttributeError(f"module 'dofaclip' has no attribute {name!r}")
    from importlib import import_module
    value = getattr(import_module(f'{__name__}.{_MODULE_OF[name]}'), name)
    globals()[name] = value
    return value


def __dir__(): return sorted(set(globals()) | set(_MODULE_OF))
