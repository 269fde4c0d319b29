"""The default model's conversion: the GGUF file is parsed once, and the patch on the gguf module is undone."""

import gguf

from fast_srt.run import models


def test_a_gguf_file_is_parsed_once_inside_a_conversion_and_the_module_is_restored():
    path = models.default_gguf_path()
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with models._gguf_parsed_once():
        first, again = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert first is again
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == "llama")
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map
    assert gguf.GGUFReader(path) is not first


def test_the_module_is_restored_when_the_conversion_fails():
    real_reader = gguf.GGUFReader
    try:
        with models._gguf_parsed_once():
            raise RuntimeError("a conversion that fails")
    except RuntimeError:
        pass
    assert gguf.GGUFReader is real_reader
