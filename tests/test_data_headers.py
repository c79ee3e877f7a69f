"""`headers.inspect` reads the size an image declares without decoding it, and
flags the headers the decoders would fail on (JPEG: without SOS then EOI)."""
import io
import struct
import zlib

import numpy as np
import pytest

pytest.importorskip('tensorflow')
from PIL import Image  # noqa: E402

from nfnet_jax.data import headers  # noqa: E402
from nfnet_jax.data._tf import tf  # noqa: E402

LIMIT = 100_000_000


def _encode(h, w, fmt, **kw) -> bytes:
  rng = np.random.default_rng(h * 1000 + w)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, fmt, **kw)
  return buf.getvalue()


def _inspect(payload: bytes, limit: int = LIMIT):
  return tuple(int(v) for v in headers.inspect(tf.constant(payload), limit).numpy())


def _png_header(w, h) -> bytes:
  body = struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + struct.pack('>I', len(body)) + b'IHDR' + body
          + struct.pack('>I', zlib.crc32(b'IHDR' + body)))


@pytest.mark.parametrize('fmt,kw', [('JPEG', {}), ('JPEG', dict(progressive=True)),
                                    ('PNG', {}), ('GIF', {}), ('BMP', {}), ('WEBP', {}),
                                    ('WEBP', dict(lossless=True))])
def test_declared_size_of_every_format(fmt, kw):
  assert _inspect(_encode(37, 53, fmt, **kw)) == (headers.OK, 37, 53)


def test_more_pixels_than_the_limit_is_too_large():
  assert _inspect(_png_header(20000, 20000)) == (headers.TOO_LARGE, 20000, 20000)
  assert _inspect(_encode(30, 40, 'JPEG'), limit=30 * 40 - 1) == (headers.TOO_LARGE, 30, 40)
  assert _inspect(_encode(30, 40, 'JPEG'), limit=30 * 40) == (headers.OK, 30, 40)
  vp8x = b'RIFF\0\0\0\0WEBPVP8X' + bytes(8) + (16383).to_bytes(3, 'little') * 2
  assert _inspect(vp8x) == (headers.TOO_LARGE, 16384, 16384)


def test_broken_headers():
  jpeg = _encode(40, 40, 'JPEG')
  assert _inspect(jpeg[:len(jpeg) // 2])[0] == headers.BROKEN      # truncated: no EOI
  assert _inspect(b'\xff\xd8\xff\xe0 junk')[0] == headers.BROKEN
  assert _inspect(jpeg + b'trailing bytes') == (headers.OK, 40, 40)
  assert _inspect(_encode(9, 9, 'PNG')[:20])[0] == headers.BROKEN
  assert _inspect(_png_header(0, 10))[0] == headers.BROKEN
  assert _inspect(b'GIF89a\x01')[0] == headers.BROKEN
  # Not an image format: the decoder decides.
  assert _inspect(b'plain text') == (headers.OK, -1, -1)
