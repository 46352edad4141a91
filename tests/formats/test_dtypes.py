import numpy as np
import pytest

from bnexporter.formats import dtypes


def test_bfloat16_decodes_by_shifting_into_float32():
    values = np.array([1.0, -2.5, 3.0e38, 1e-30, np.inf], dtype=np.float32)
    bf16_bits = (values.view(np.uint32) >> 16).astype("<u2")
    out = dtypes.decode(bf16_bits.tobytes(), "bfloat16")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:4], values[:4], rtol=1e-2)
    assert np.isinf(out[4])


@pytest.mark.parametrize("dtype,code,value", [
    ("float8_e4m3fn", 0x38, 1.0),     # exponent 7 (bias 7), mantissa 0
    ("float8_e4m3fn", 0x7E, 448.0),   # largest finite e4m3fn
    ("float8_e5m2", 0x3C, 1.0),
    ("float8_e5m2", 0x7C, np.inf),
    ("float8_e4m3fn", 0xB8, -1.0),
])
def test_float8_table_matches_the_bit_layout(dtype, code, value):
    assert dtypes.decode(bytes([code]), dtype)[0] == value


def test_float8_e4m3fn_nan_code():
    assert np.isnan(dtypes.decode(bytes([0x7F]), "float8_e4m3fn")[0])


def test_big_endian_values_come_out_native():
    data = np.array([1.5, -3.25], dtype=">f4").tobytes()
    out = dtypes.decode(data, "float32", big_endian=True)
    assert out.tolist() == [1.5, -3.25]
    assert out.dtype.byteorder in "=<"


def test_limits_respect_the_dtype():
    big, tiny = dtypes.finfo_limits("float16")
    assert big == 65504.0 and tiny == pytest.approx(6.1035e-05, rel=1e-3)
    assert dtypes.finfo_limits("float8_e4m3fn")[0] == 448.0
