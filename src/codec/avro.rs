//! Avro binary primitives: zig-zag varints, IEEE floats, length-prefixed strings.
//!
//! The reader never panics on bad input: every read checks bounds and returns a message that
//! says what was wrong, so a malformed record becomes a dead-letter entry, not a crash.

/// Appends an Avro `long` (or `int`): zig-zag, then base-128 varint.
pub fn put_long(buf: &mut Vec<u8>, v: i64) {
    let mut n = ((v << 1) ^ (v >> 63)) as u64;
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

/// Appends an Avro `double`.
pub fn put_double(buf: &mut Vec<u8>, v: f64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

/// Appends an Avro `float`.
pub fn put_float(buf: &mut Vec<u8>, v: f32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

/// Appends an Avro `boolean`.
pub fn put_bool(buf: &mut Vec<u8>, v: bool) {
    buf.push(v as u8);
}

/// Appends an Avro `string`.
pub fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_long(buf, s.len() as i64);
    buf.extend_from_slice(s.as_bytes());
}

/// Reads Avro primitives from a byte slice.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A read failure, described for humans.
pub type ReadResult<T> = Result<T, String>;

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Reads a `long`.
    pub fn long(&mut self) -> ReadResult<i64> {
        let mut n: u64 = 0;
        let mut shift = 0;
        loop {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(format!("truncated varint at byte {}", self.pos));
            };
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(format!("varint overflows 64 bits at byte {}", self.pos - 1));
            }
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(((n >> 1) as i64) ^ -((n & 1) as i64));
            }
            shift += 7;
        }
    }

    /// Reads an `int`, checking it fits 32 bits.
    pub fn int(&mut self) -> ReadResult<i32> {
        let v = self.long()?;
        i32::try_from(v).map_err(|_| format!("int out of range: {v}"))
    }

    fn take(&mut self, n: usize) -> ReadResult<&'a [u8]> {
        if self.remaining() < n {
            return Err(format!(
                "truncated: needs {n} bytes at byte {}, has {}",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Reads a `double`.
    pub fn double(&mut self) -> ReadResult<f64> {
        let b = self.take(8)?;
        Ok(f64::from_le_bytes(
            b.try_into().expect("take returned 8 bytes"),
        ))
    }

    /// Reads a `float`.
    pub fn float(&mut self) -> ReadResult<f32> {
        let b = self.take(4)?;
        Ok(f32::from_le_bytes(
            b.try_into().expect("take returned 4 bytes"),
        ))
    }

    /// Reads a `boolean`.
    pub fn bool(&mut self) -> ReadResult<bool> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("invalid boolean byte {b}")),
        }
    }

    /// Reads a `string`, borrowing it from the input.
    pub fn str(&mut self) -> ReadResult<&'a str> {
        let len = self.long()?;
        let len = usize::try_from(len).map_err(|_| format!("negative string length {len}"))?;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|e| format!("string is not UTF-8: {e}"))
    }

    /// Reads a block count of an array or map; a negative count is followed by a byte size.
    pub fn block_count(&mut self) -> ReadResult<usize> {
        let n = self.long()?;
        if n < 0 {
            self.long()?;
        }
        let n = n.unsigned_abs() as usize;
        // Each item takes at least one byte: a larger count is a lie, refuse it before
        // anything allocates for it.
        if n > self.remaining() {
            return Err(format!(
                "block count {n} exceeds the {} bytes left",
                self.remaining()
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn long_round_trips(v in any::<i64>()) {
            let mut buf = Vec::new();
            put_long(&mut buf, v);
            let mut c = Cursor::new(&buf);
            prop_assert_eq!(c.long().unwrap(), v);
            prop_assert_eq!(c.remaining(), 0);
        }

        #[test]
        fn reads_never_panic_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut c = Cursor::new(&bytes);
            let _ = c.str();
            let _ = c.long();
            let _ = c.double();
            let _ = c.block_count();
        }
    }

    #[test]
    fn matches_the_avro_spec_examples() {
        // From the Avro specification: zig-zag encoding of small longs.
        for (v, bytes) in [
            (0i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
        ] {
            let mut buf = Vec::new();
            put_long(&mut buf, v);
            assert_eq!(buf, bytes, "{v}");
        }
    }
}
