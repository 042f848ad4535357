//! Reading the filter's own binary layouts (cache entries, flight leases) field by field:
//! big-endian numbers and length-prefixed bytes, where anything short reads as `None`, never
//! a panic.

pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    /// The next `n` bytes as UTF-8.
    pub fn str(&mut self, n: usize) -> Option<&'a str> {
        std::str::from_utf8(self.take(n)?).ok()
    }

    /// Bytes not read yet.
    pub fn rest(&self) -> usize {
        self.bytes.len().saturating_sub(self.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_in_order_and_nothing_past_the_end() {
        let mut r = Reader::new(&[0, 0, 0, 2, b'h', b'i', 7]);
        let n = r.u32().unwrap() as usize;
        assert_eq!(r.str(n), Some("hi"));
        assert_eq!(r.rest(), 1);
        assert_eq!(r.u8(), Some(7));
        assert_eq!((r.u8(), r.u32(), r.u64(), r.take(1)), (None, None, None, None));
        assert_eq!(Reader::new(&[0xff]).str(1), None, "not UTF-8");
        assert_eq!(Reader::new(&[1, 2]).take(usize::MAX), None, "no overflow");
    }
}
