//! The request `id` of a MessagePack frame, read by walking the bytes without recursion.
//!
//! A frame refused for its nesting (deeper than [`MAX_DEPTH`](super::codec::MAX_DEPTH)) must
//! still be answered with its `id`, or the client's request waits forever. The serde decoder
//! cannot be used for that: it recurses into every value it skips, and a deep enough frame
//! overflows a task's stack (which is why its own depth limit exists). This walker keeps a count
//! of values still to skip instead of a call stack, so any frame costs O(len) time and O(1) memory.

/// The `id` field of the top-level map, if it is there and a u32.
pub fn id(frame: &[u8]) -> Option<u32> {
    let mut r = Reader {
        bytes: frame,
        at: 0,
    };
    let entries = match r.byte()? {
        m @ 0x80..=0x8f => u64::from(m & 0x0f),
        0xde => r.uint(2)?,
        0xdf => r.uint(4)?,
        _ => return None,
    };
    for _ in 0..entries {
        if r.str_key()? == Some(b"id".as_slice()) {
            return r.u32_value();
        }
        r.skip_value()?;
    }
    None
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn take(&mut self, n: u64) -> Option<&'a [u8]> {
        let n = usize::try_from(n).ok()?;
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    /// A big-endian unsigned integer of `n` bytes.
    fn uint(&mut self, n: u64) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |v, b| (v << 8) | u64::from(*b)),
        )
    }

    /// A map key: `Some(bytes)` for a string key, `None` for any other (skipped) key.
    fn str_key(&mut self) -> Option<Option<&'a [u8]>> {
        let len = match *self.bytes.get(self.at)? {
            m @ 0xa0..=0xbf => {
                self.at += 1;
                u64::from(m & 0x1f)
            }
            0xd9 => {
                self.at += 1;
                self.uint(1)?
            }
            0xda => {
                self.at += 1;
                self.uint(2)?
            }
            0xdb => {
                self.at += 1;
                self.uint(4)?
            }
            _ => {
                self.skip_value()?;
                return Some(None);
            }
        };
        self.take(len).map(Some)
    }

    fn u32_value(&mut self) -> Option<u32> {
        let v: i128 = match self.byte()? {
            m @ 0x00..=0x7f => i128::from(m),
            0xcc => i128::from(self.uint(1)?),
            0xcd => i128::from(self.uint(2)?),
            0xce => i128::from(self.uint(4)?),
            0xcf => i128::from(self.uint(8)?),
            0xd0 => i128::from(self.uint(1)? as u8 as i8),
            0xd1 => i128::from(self.uint(2)? as u16 as i16),
            0xd2 => i128::from(self.uint(4)? as u32 as i32),
            0xd3 => i128::from(self.uint(8)? as i64),
            _ => return None,
        };
        u32::try_from(v).ok()
    }

    /// Skips one value, however deeply nested, iteratively.
    fn skip_value(&mut self) -> Option<()> {
        // Values still to skip. Every value is at least one byte, so a hostile length only
        // makes the walk run out of bytes, never loop longer than the frame.
        let mut pending: u64 = 1;
        while pending > 0 {
            pending -= 1;
            let nested = match self.byte()? {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
                m @ 0x80..=0x8f => 2 * u64::from(m & 0x0f),
                m @ 0x90..=0x9f => u64::from(m & 0x0f),
                m @ 0xa0..=0xbf => self.take(u64::from(m & 0x1f)).map(|_| 0)?,
                0xc1 => return None,
                0xc4 | 0xd9 => self.sized(1, 0)?,
                0xc5 | 0xda => self.sized(2, 0)?,
                0xc6 | 0xdb => self.sized(4, 0)?,
                0xc7 => self.sized(1, 1)?,
                0xc8 => self.sized(2, 1)?,
                0xc9 => self.sized(4, 1)?,
                0xca | 0xce | 0xd2 => self.take(4).map(|_| 0)?,
                0xcb | 0xcf | 0xd3 => self.take(8).map(|_| 0)?,
                0xcc | 0xd0 => self.take(1).map(|_| 0)?,
                0xcd | 0xd1 => self.take(2).map(|_| 0)?,
                0xd4 => self.take(2).map(|_| 0)?,
                0xd5 => self.take(3).map(|_| 0)?,
                0xd6 => self.take(5).map(|_| 0)?,
                0xd7 => self.take(9).map(|_| 0)?,
                0xd8 => self.take(17).map(|_| 0)?,
                0xdc => self.uint(2)?,
                0xdd => self.uint(4)?,
                0xde => 2 * self.uint(2)?,
                0xdf => 2 * self.uint(4)?,
            };
            pending = pending.saturating_add(nested);
        }
        Some(())
    }

    /// Skips a str/bin/ext payload whose length has `len_bytes` bytes, plus `extra` bytes (the
    /// ext type). Returns 0 nested values.
    fn sized(&mut self, len_bytes: u64, extra: u64) -> Option<u64> {
        let len = self.uint(len_bytes)?;
        self.take(len.checked_add(extra)?)?;
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deep(depth: usize) -> serde_json::Value {
        let mut v = serde_json::json!(1);
        for _ in 0..depth {
            v = serde_json::json!([v, {"k": "v", "n": -5, "f": 1.5, "b": true}]);
        }
        v
    }

    #[test]
    fn finds_the_id_after_values_of_every_kind() {
        for id in [0u32, 9, 200, 70_000, u32::MAX] {
            let frame = serde_json::json!({
                "type": "join", "room": "scene:1", "state": deep(50), "x": null, "id": id,
            });
            let bytes = rmp_serde::to_vec_named(&frame).unwrap();
            assert_eq!(self::id(&bytes), Some(id));
        }
    }

    #[test]
    fn survives_any_depth_and_garbage() {
        // 100,000 nested arrays before the id: no recursion, so no stack overflow.
        let mut frame = vec![0x82, 0xa5];
        frame.extend_from_slice(b"state");
        frame.extend(std::iter::repeat_n(0x91, 100_000));
        frame.push(0xc0);
        frame.extend_from_slice(&[0xa2, b'i', b'd', 0x07]);
        assert_eq!(id(&frame), Some(7));
        // Truncated, hostile lengths, not a map, an id that is not a u32.
        assert_eq!(id(&frame[..frame.len() - 1]), None);
        assert_eq!(id(&[0x81, 0xa1, b'x', 0xdd, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(id(&[0x91, 0x01]), None);
        assert_eq!(id(&[0x81, 0xa2, b'i', b'd', 0xff]), None);
        assert_eq!(id(&[]), None);
    }
}
