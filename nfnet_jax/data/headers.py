"""What an encoded image's header declares, read without a decoder.

`inspect_bytes(data, max_pixels)` gives, for the encoded bytes of one image, a
status (`OK`, `BROKEN`, `TOO_LARGE`) and the declared (h, w); `inspect` is the
same inside a tf.data graph. The input pipeline runs it before any decoder, so

- an image declaring more than `max_pixels` pixels (a decompression bomb: a
  1 MB PNG can declare 20000 x 20000 pixels, a 1.2 GB decode) is never decoded;
- a JPEG whose marker structure is broken, or which is truncated (no EOI marker
  after its first scan), never reaches libjpeg, which writes a line to stderr
  for every such file (from C, so it cannot be silenced per call).

Formats and where their size lives: JPEG (the SOFn segment, found by walking the
marker segments), PNG (IHDR), GIF (logical screen), BMP (DIB header), WebP
(VP8 / VP8L / VP8X chunk). Bytes of any other format give status `OK` and
(-1, -1): the decoder decides. A GIF's frame count is not in its header, so an
animation is bounded per frame only.

Plain Python on bytes (a few segments are walked, the EOI found by `bytes.rfind`),
about 10 us per image: the same walk as TF graph ops costs milliseconds.
"""
from __future__ import annotations

import struct
from typing import Tuple

OK, BROKEN, TOO_LARGE = 0, 1, 2
# Marker segments walked before the first SOS; real files have a few dozen.
_MAX_SEGMENTS = 1000
_SOF = frozenset([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                  0xCE, 0xCF])
_UNKNOWN = (-1, -1)


def _jpeg(b: bytes) -> Tuple[bool, int, int]:
  """(ok, h, w): well-formed marker segments after SOI up to the first SOS, a SOFn
  with a non-zero size, and an EOI marker after that SOS."""
  pos, n, size = 2, len(b), None
  for _ in range(_MAX_SEGMENTS):
    if pos + 4 > n or b[pos] != 0xFF:
      return False, -1, -1
    marker = b[pos + 1]
    if marker == 0xFF:                    # fill byte before a marker
      pos += 1
      continue
    if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
      pos += 2
      continue
    (length,) = struct.unpack_from('>H', b, pos + 2)
    if length < 2:
      return False, -1, -1
    if marker in _SOF and length >= 7 and pos + 9 <= n:
      size = struct.unpack_from('>HH', b, pos + 5)
    if marker == 0xDA:                    # SOS: entropy-coded data follows
      if size is None or min(size) == 0 or b.rfind(b'\xff\xd9') <= pos:
        return False, -1, -1
      return True, size[0], size[1]
    pos += 2 + length
  return False, -1, -1


def _webp(b: bytes) -> Tuple[bool, int, int]:
  if len(b) < 30:
    return False, -1, -1
  chunk = b[12:16]
  if chunk == b'VP8 ':
    w, h = struct.unpack_from('<HH', b, 26)
    return True, h & 0x3FFF, w & 0x3FFF
  if chunk == b'VP8L':
    (bits,) = struct.unpack_from('<I', b, 21)
    return True, ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
  if chunk == b'VP8X':
    w = int.from_bytes(b[24:27], 'little') + 1
    return True, int.from_bytes(b[27:30], 'little') + 1, w
  return True, -1, -1


def _declared(b: bytes) -> Tuple[bool, int, int]:
  """(header well formed, h, w) with (-1, -1) for an unknown size."""
  if b.startswith(b'\xff\xd8\xff'):
    return _jpeg(b)
  if b.startswith(b'\x89PNG\r\n\x1a\n'):
    if len(b) < 24 or b[12:16] != b'IHDR':
      return False, -1, -1
    w, h = struct.unpack_from('>II', b, 16)
    return True, h, w
  if b.startswith((b'GIF87a', b'GIF89a')):
    if len(b) < 10:
      return False, -1, -1
    w, h = struct.unpack_from('<HH', b, 6)
    return True, h, w
  if b.startswith(b'BM'):
    if len(b) < 26:
      return False, -1, -1
    if struct.unpack_from('<I', b, 14)[0] == 12:   # BITMAPCOREHEADER: 16-bit sizes
      w, h = struct.unpack_from('<HH', b, 18)
      return True, h, w
    w, h = struct.unpack_from('<ii', b, 18)
    return True, abs(h), abs(w)                    # negative height: top-down rows
  if b.startswith(b'RIFF') and b[8:12] == b'WEBP':
    return _webp(b)
  return True, -1, -1


def inspect_bytes(data: bytes, max_pixels: int) -> Tuple[int, int, int]:
  """Encoded image bytes -> (status, h, w).

  status: BROKEN for a JPEG/PNG/GIF/BMP/WebP whose header is cut short or
  malformed, declares a zero size, or (JPEG) has no EOI after its scan;
  TOO_LARGE when h * w > max_pixels; else OK. (h, w) is (-1, -1) when unknown.
  """
  ok, h, w = _declared(bytes(data))
  if not ok or (h, w) != _UNKNOWN and min(h, w) <= 0:
    return BROKEN, -1, -1
  if (h, w) != _UNKNOWN and h * w > max_pixels:
    return TOO_LARGE, h, w
  return OK, h, w


def inspect(data, max_pixels: int):
  """`inspect_bytes` in a TF graph: scalar tf.string -> int64 [3] (status, h, w)."""
  from nfnet_jax.data._tf import tf
  import numpy as np

  def run(d):
    return np.array(inspect_bytes(d, max_pixels), np.int64)
  out = tf.numpy_function(run, [data], tf.int64, stateful=False)
  out.set_shape([3])
  return out
