"""What an encoded image's header declares, read in the TF graph before decoding.

`inspect(data, max_pixels)` gives, for the encoded bytes of one image, its
status (`OK`, `BROKEN`, `TOO_LARGE`) and declared size. The input pipeline runs
it before any decoder, so that

- an image declaring more than `max_pixels` pixels (a decompression bomb: a
  1 MB PNG can declare 20000 x 20000 pixels, a 1.2 GB decode) is never decoded;
- a JPEG without the markers of a whole image (SOI, SOS, then EOI: a junk
  header, or a truncated file) never reaches libjpeg, which writes a line to
  stderr for each such file from C, where it cannot be silenced per call.

Where the size lives: JPEG, the SOFn segment (read by `extract_jpeg_shape`, which
parses headers only); PNG, IHDR; GIF, the logical screen; BMP, the DIB header;
WebP, the VP8 / VP8L / VP8X chunk. Bytes of any other format are `OK` with an
unknown size (-1, -1): the decoder decides. A GIF's frame count is not in its
header, so an animation is bounded per frame only. Graph ops only (no Python
callback): a few fixed-offset reads and, for JPEG, two byte comparisons over the
file.
"""
from __future__ import annotations

from typing import Tuple

from nfnet_jax.data._tf import tf

OK, BROKEN, TOO_LARGE = 0, 1, 2
_PAD = 32  # zero bytes appended so that fixed-offset header reads stay in range


def _at(b, i: int):
  """Byte i of b (uint8 [n + _PAD]) as int64."""
  return tf.cast(b[i], tf.int64)


def _be(b, off: int, size: int):
  """Big-endian unsigned integer of `size` bytes at `off` (int64)."""
  value = tf.constant(0, tf.int64)
  for k in range(size):
    value = value * 256 + _at(b, off + k)
  return value


def _le(b, off: int, size: int):
  """Little-endian unsigned integer of `size` bytes at `off` (int64)."""
  value = tf.constant(0, tf.int64)
  for k in reversed(range(size)):
    value = value * 256 + _at(b, off + k)
  return value


def _starts(b, magic: bytes, off: int = 0):
  return tf.reduce_all(tf.equal(b[off:off + len(magic)], tf.constant(list(magic), tf.uint8)))


def _jpeg(data, b):
  """(ok, h, w): an SOS marker (FF DA) with an EOI marker (FF D9) after it, then
  the SOFn size as libjpeg reads it from the headers. Entropy-coded data never
  holds FF DA or FF D9 (an FF there is followed by 00 or a restart marker)."""
  ff = tf.equal(b[:-1], tf.constant(0xFF, tf.uint8))
  sos = tf.where(ff & tf.equal(b[1:], tf.constant(0xDA, tf.uint8)))[:, 0]
  eoi = tf.where(ff & tf.equal(b[1:], tf.constant(0xD9, tf.uint8)))[:, 0]
  whole = (tf.size(sos) > 0) & (tf.size(eoi) > 0)
  whole = whole & (tf.reduce_max(tf.concat([eoi, [-1]], 0))
                   > tf.reduce_min(tf.concat([sos, [tf.int64.max]], 0)))

  def size():
    return tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)
  hw = tf.cond(whole, size, lambda: tf.constant([-1, -1], tf.int64))
  return whole, hw[0], hw[1]


def _webp(b):
  """(h, w) from the first chunk of a RIFF/WEBP file; (-1, -1) for another chunk."""
  bits = _le(b, 21, 4)
  sizes = {b'VP8 ': (_le(b, 28, 2) % 16384, _le(b, 26, 2) % 16384),
           b'VP8L': ((bits // 16384) % 16384 + 1, bits % 16384 + 1),
           b'VP8X': (_le(b, 27, 3) + 1, _le(b, 24, 3) + 1)}
  h = w = tf.constant(-1, tf.int64)
  for tag, (th, tw) in sizes.items():
    h, w = tf.where(_starts(b, tag, 12), th, h), tf.where(_starts(b, tag, 12), tw, w)
  return h, w


def inspect(data, max_pixels: int) -> tf.Tensor:
  """Encoded bytes (scalar tf.string) -> int64 [3]: (status, h, w).

  status: BROKEN for a JPEG/PNG/GIF/BMP/WebP header cut short or declaring a zero
  size, or a JPEG without SOS then EOI; TOO_LARGE when h * w > max_pixels; else
  OK. (h, w) is (-1, -1) when unknown (another format, or BROKEN).
  """
  raw = tf.io.decode_raw(data, tf.uint8)
  n = tf.cast(tf.size(raw), tf.int64)
  b = tf.concat([raw, tf.zeros([_PAD], tf.uint8)], 0)
  minus1 = tf.constant(-1, tf.int64)

  def jpeg():
    return _jpeg(data, b)

  def other():
    core = tf.equal(_le(b, 14, 4), 12)               # BITMAPCOREHEADER: 16-bit sizes
    bmp_h = tf.where(core, _le(b, 20, 2), _le(b, 22, 4))
    bmp_h = tf.where(~core & (bmp_h >= 2 ** 31), 2 ** 32 - bmp_h, bmp_h)  # top-down rows
    webp_h, webp_w = _webp(b)
    # (is this format, header long enough, h, w)
    formats = [
        (_starts(b, b'\x89PNG\r\n\x1a\n'), _starts(b, b'IHDR', 12) & (n >= 24),
         _be(b, 20, 4), _be(b, 16, 4)),
        (_starts(b, b'GIF87a') | _starts(b, b'GIF89a'), n >= 10, _le(b, 8, 2), _le(b, 6, 2)),
        (_starts(b, b'BM'), n >= 26, bmp_h, tf.where(core, _le(b, 18, 2), _le(b, 18, 4))),
        (_starts(b, b'RIFF') & _starts(b, b'WEBP', 8), n >= 30, webp_h, webp_w)]
    ok, h, w = tf.constant(True), minus1, minus1
    for is_fmt, long_enough, fh, fw in formats:
      ok = tf.where(is_fmt, long_enough, ok)
      h, w = tf.where(is_fmt, fh, h), tf.where(is_fmt, fw, w)
    return ok, h, w

  ok, h, w = tf.cond(_starts(b, b'\xff\xd8\xff'), jpeg, other)
  known = (h >= 0) & (w >= 0)
  ok = ok & (~known | ((h > 0) & (w > 0)))
  status = tf.where(~ok, tf.constant(BROKEN, tf.int64),
                    tf.where(known & (h * w > max_pixels), tf.constant(TOO_LARGE, tf.int64),
                             tf.constant(OK, tf.int64)))
  return tf.where(ok, tf.stack([status, h, w]), tf.stack([status, minus1, minus1]))
