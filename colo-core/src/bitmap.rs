//! The dirty-page bitmap: one bit per guest page frame (pfn), word-at-a-time set algebra.
//!
//! A [`DirtyBitmap`] has a fixed length, the guest's page count. Bit `n` is bit `n % 64` of word
//! `n / 64`, so the little-endian byte image of the words is exactly Xen's log-dirty layout (bit
//! `n` is bit `n % 8` of byte `n / 8`), which [`DirtyBitmap::from_xen_bytes`] and
//! [`DirtyBitmap::write_xen_bytes`] convert without per-bit loops.
//!
//! Invariant: bits at or beyond `len` in the last word are always zero, so counts and set
//! operations never see phantom pages.

use thiserror::Error;

/// Errors from bitmap conversions. Every one names the offending value.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BitmapError {
    /// A pfn at or beyond the bitmap's length.
    #[error("pfn {pfn:#x} is beyond the guest's {len} pages")]
    PfnOutOfRange {
        /// The offending pfn.
        pfn: u64,
        /// The bitmap's length in pages.
        len: u64,
    },
    /// Two bitmaps of different lengths were combined.
    #[error("bitmap lengths differ: {left} pages vs {right} pages")]
    LengthMismatch {
        /// Length of `self`.
        left: u64,
        /// Length of the other bitmap.
        right: u64,
    },
    /// A Xen-layout byte buffer too short for the bitmap's length.
    #[error("Xen log-dirty buffer holds {got} bytes, {need} are needed for {len} pages")]
    XenBufferTooShort {
        /// Bytes given.
        got: usize,
        /// Bytes needed.
        need: usize,
        /// Pages in the bitmap.
        len: u64,
    },
}

const WORD_BITS: u64 = 64;

/// A fixed-length set of guest page frame numbers.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    len: u64,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("len", &self.len)
            .field("count", &self.count())
            .finish()
    }
}

fn words_for(len: u64) -> usize {
    len.div_ceil(WORD_BITS) as usize
}

impl DirtyBitmap {
    /// An empty bitmap over `len` pages.
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; words_for(len)],
            len,
        }
    }

    /// A bitmap over `len` pages with every page set.
    pub fn full(len: u64) -> Self {
        let mut b = Self {
            words: vec![u64::MAX; words_for(len)],
            len,
        };
        b.mask_tail();
        b
    }

    /// The number of pages this bitmap covers (the guest's page count).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the bitmap covers no pages at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The backing words: bit `n` is bit `n % 64` of word `n / 64`.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Clears the bits beyond `len` in the last word (every constructor and operation in this
    /// module keeps that invariant).
    fn mask_tail(&mut self) {
        let rem = self.len % WORD_BITS;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    fn check(&self, pfn: u64) -> Result<(), BitmapError> {
        if pfn < self.len {
            Ok(())
        } else {
            Err(BitmapError::PfnOutOfRange { pfn, len: self.len })
        }
    }

    /// Marks `pfn` dirty.
    pub fn set(&mut self, pfn: u64) -> Result<(), BitmapError> {
        self.check(pfn)?;
        self.words[(pfn / WORD_BITS) as usize] |= 1 << (pfn % WORD_BITS);
        Ok(())
    }

    /// Marks every pfn in `start..end` dirty, a word at a time.
    pub fn set_range(&mut self, start: u64, end: u64) -> Result<(), BitmapError> {
        if start >= end {
            return Ok(());
        }
        self.check(end - 1)?;
        let (sw, ew) = (
            (start / WORD_BITS) as usize,
            ((end - 1) / WORD_BITS) as usize,
        );
        let lo = u64::MAX << (start % WORD_BITS);
        let hi = u64::MAX >> (WORD_BITS - 1 - (end - 1) % WORD_BITS);
        if sw == ew {
            self.words[sw] |= lo & hi;
        } else {
            self.words[sw] |= lo;
            for w in &mut self.words[sw + 1..ew] {
                *w = u64::MAX;
            }
            self.words[ew] |= hi;
        }
        Ok(())
    }

    /// Is `pfn` dirty? A pfn beyond the length is an error.
    pub fn test(&self, pfn: u64) -> Result<bool, BitmapError> {
        self.check(pfn)?;
        Ok(self.words[(pfn / WORD_BITS) as usize] & (1 << (pfn % WORD_BITS)) != 0)
    }

    /// Marks `pfn` clean.
    pub fn clear(&mut self, pfn: u64) -> Result<(), BitmapError> {
        self.check(pfn)?;
        self.words[(pfn / WORD_BITS) as usize] &= !(1 << (pfn % WORD_BITS));
        Ok(())
    }

    /// Marks every page clean.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    fn same_len(&self, other: &Self) -> Result<(), BitmapError> {
        if self.len == other.len {
            Ok(())
        } else {
            Err(BitmapError::LengthMismatch {
                left: self.len,
                right: other.len,
            })
        }
    }

    /// `self = self ∪ other`.
    pub fn union_with(&mut self, other: &Self) -> Result<(), BitmapError> {
        self.same_len(other)?;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        Ok(())
    }

    /// `self = self − other`.
    pub fn difference_with(&mut self, other: &Self) -> Result<(), BitmapError> {
        self.same_len(other)?;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
        Ok(())
    }

    /// `self = self ∩ other`.
    pub fn intersect_with(&mut self, other: &Self) -> Result<(), BitmapError> {
        self.same_len(other)?;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= *b;
        }
        Ok(())
    }

    /// `|self − other|` without building the difference.
    pub fn count_difference(&self, other: &Self) -> Result<u64, BitmapError> {
        self.same_len(other)?;
        Ok(self
            .words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| u64::from((a & !b).count_ones()))
            .sum())
    }

    /// Copies `other` into `self` without reallocating.
    pub fn copy_from(&mut self, other: &Self) -> Result<(), BitmapError> {
        self.same_len(other)?;
        self.words.copy_from_slice(&other.words);
        Ok(())
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Iterates over dirty pfns in ascending order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            words: &self.words,
            idx: 0,
            cur: self.words.first().copied().unwrap_or(0),
        }
    }

    /// Iterates over maximal runs of consecutive dirty pfns as half-open ranges `start..end`.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            bitmap: self,
            pos: 0,
        }
    }

    /// Builds a bitmap of `len` pages from a list of pfns (any order, duplicates allowed).
    pub fn from_pfns(len: u64, pfns: &[u64]) -> Result<Self, BitmapError> {
        let mut b = Self::new(len);
        b.set_pfns(pfns)?;
        Ok(b)
    }

    /// Sets every pfn of `pfns`. On error nothing past the offending pfn is set, and the pfns
    /// before it remain set.
    pub fn set_pfns(&mut self, pfns: &[u64]) -> Result<(), BitmapError> {
        for &p in pfns {
            self.set(p)?;
        }
        Ok(())
    }

    /// Appends the dirty pfns, ascending, to `out`.
    pub fn extend_pfns(&self, out: &mut Vec<u64>) {
        out.reserve(self.count() as usize);
        out.extend(self.iter());
    }

    /// The dirty pfns, ascending.
    pub fn to_pfns(&self) -> Vec<u64> {
        let mut v = Vec::new();
        self.extend_pfns(&mut v);
        v
    }

    /// Number of bytes of Xen's log-dirty layout for `len` pages.
    pub fn xen_bytes_len(len: u64) -> usize {
        len.div_ceil(8) as usize
    }

    /// Builds a bitmap from Xen's log-dirty layout (bit `n` is bit `n % 8` of byte `n / 8`).
    /// Bits beyond `len` in the buffer are ignored.
    pub fn from_xen_bytes(len: u64, bytes: &[u8]) -> Result<Self, BitmapError> {
        let mut b = Self::new(len);
        b.or_xen_bytes(bytes)?;
        Ok(b)
    }

    /// ORs a Xen log-dirty buffer into this bitmap, eight bytes at a time.
    pub fn or_xen_bytes(&mut self, bytes: &[u8]) -> Result<(), BitmapError> {
        let need = Self::xen_bytes_len(self.len);
        if bytes.len() < need {
            return Err(BitmapError::XenBufferTooShort {
                got: bytes.len(),
                need,
                len: self.len,
            });
        }
        self.or_xen_prefix(bytes);
        Ok(())
    }

    /// ORs a Xen log-dirty buffer of any length into this bitmap: bits beyond the bitmap are
    /// dropped, pages beyond the buffer are left as they are (used to merge back a partial
    /// harvest).
    pub fn or_xen_prefix(&mut self, bytes: &[u8]) {
        let bytes = &bytes[..bytes.len().min(Self::xen_bytes_len(self.len))];
        let mut chunks = bytes.chunks_exact(8);
        let mut n = 0;
        for (w, c) in self.words.iter_mut().zip(&mut chunks) {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            *w |= u64::from_le_bytes(a);
            n += 1;
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut a = [0u8; 8];
            a[..rest.len()].copy_from_slice(rest);
            if let Some(w) = self.words.get_mut(n) {
                *w |= u64::from_le_bytes(a);
            }
        }
        self.mask_tail();
    }

    /// Writes the bitmap in Xen's log-dirty layout into `out`, which must hold at least
    /// [`DirtyBitmap::xen_bytes_len`] bytes; the rest of `out` is left untouched.
    pub fn write_xen_bytes(&self, out: &mut [u8]) -> Result<(), BitmapError> {
        let need = Self::xen_bytes_len(self.len);
        if out.len() < need {
            return Err(BitmapError::XenBufferTooShort {
                got: out.len(),
                need,
                len: self.len,
            });
        }
        let out = &mut out[..need];
        let mut chunks = out.chunks_exact_mut(8);
        for (w, c) in self.words.iter().zip(&mut chunks) {
            c.copy_from_slice(&w.to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            if let Some(last) = self.words.last() {
                let n = rest.len();
                rest.copy_from_slice(&last.to_le_bytes()[..n]);
            }
        }
        Ok(())
    }

    /// The bitmap in Xen's log-dirty layout.
    pub fn to_xen_bytes(&self) -> Vec<u8> {
        let mut v = vec![0; Self::xen_bytes_len(self.len)];
        // Cannot fail: the buffer has exactly the needed length.
        let _ = self.write_xen_bytes(&mut v);
        v
    }
}

/// Iterator over set pfns, ascending; see [`DirtyBitmap::iter`].
#[derive(Debug)]
pub struct Iter<'a> {
    words: &'a [u64],
    idx: usize,
    cur: u64,
}

impl Iterator for Iter<'_> {
    type Item = u64;

    #[inline]
    fn next(&mut self) -> Option<u64> {
        loop {
            if self.cur != 0 {
                let bit = self.cur.trailing_zeros() as u64;
                self.cur &= self.cur - 1;
                return Some(self.idx as u64 * WORD_BITS + bit);
            }
            self.idx += 1;
            self.cur = *self.words.get(self.idx)?;
        }
    }
}

/// Iterator over runs of consecutive set pfns; see [`DirtyBitmap::runs`].
#[derive(Debug)]
pub struct Runs<'a> {
    bitmap: &'a DirtyBitmap,
    pos: u64,
}

impl Runs<'_> {
    /// First pfn ≥ `from` whose bit equals `want`, or the bitmap's length.
    fn seek(&self, from: u64, want: bool) -> u64 {
        let words = &self.bitmap.words;
        let len = self.bitmap.len;
        if from >= len {
            return len;
        }
        let mut wi = (from / WORD_BITS) as usize;
        let flip = if want { 0 } else { u64::MAX };
        let mut w = (words[wi] ^ flip) & (u64::MAX << (from % WORD_BITS));
        loop {
            if w != 0 {
                let p = wi as u64 * WORD_BITS + u64::from(w.trailing_zeros());
                return p.min(len);
            }
            wi += 1;
            match words.get(wi) {
                Some(&x) => w = x ^ flip,
                None => return len,
            }
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = std::ops::Range<u64>;

    fn next(&mut self) -> Option<Self::Item> {
        let start = self.seek(self.pos, true);
        if start >= self.bitmap.len {
            self.pos = start;
            return None;
        }
        let end = self.seek(start, false);
        self.pos = end;
        Some(start..end)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_xen_prefix_of_any_length_keeps_the_tail_clear() {
        // 70 pages: two words, the second holding 6 valid bits.
        let mut b = DirtyBitmap::new(70);
        b.or_xen_prefix(&[0xff; 3]);
        assert_eq!(b.count(), 24);
        b.or_xen_prefix(&[0xff; 64]);
        assert_eq!(b.count(), 70, "bits beyond the bitmap are dropped");
        let mut c = DirtyBitmap::new(70);
        c.or_xen_prefix(&[]);
        c.or_xen_prefix(&[0, 0, 0, 0, 0, 0, 0, 0, 0xff]);
        assert_eq!(c.to_pfns(), (64..70).collect::<Vec<u64>>());
    }

    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn model(len: u64, pfns: &[u64]) -> BTreeSet<u64> {
        pfns.iter().copied().filter(|&p| p < len).collect()
    }

    fn build(len: u64, pfns: &[u64]) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(len);
        for &p in pfns {
            if p < len {
                b.set(p).unwrap();
            }
        }
        b
    }

    fn runs_of(set: &BTreeSet<u64>) -> Vec<std::ops::Range<u64>> {
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        for &p in set {
            match out.last_mut() {
                Some(r) if r.end == p => r.end = p + 1,
                _ => out.push(p..p + 1),
            }
        }
        out
    }

    fn arb() -> impl Strategy<Value = (u64, Vec<u64>, Vec<u64>)> {
        (0u64..700).prop_flat_map(|len| {
            let pf = proptest::collection::vec(0..len.max(1) + 3, 0..200);
            (Just(len), pf.clone(), pf)
        })
    }

    proptest! {
        #[test]
        fn ops_match_model((len, a, b) in arb()) {
            let (ma, mb) = (model(len, &a), model(len, &b));
            let (ba, bb) = (build(len, &a), build(len, &b));
            prop_assert_eq!(ba.count(), ma.len() as u64);
            prop_assert_eq!(ba.iter().collect::<Vec<_>>(), ma.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(ba.runs().collect::<Vec<_>>(), runs_of(&ma));
            for p in 0..len {
                prop_assert_eq!(ba.test(p).unwrap(), ma.contains(&p));
            }
            let mut u = ba.clone();
            u.union_with(&bb).unwrap();
            prop_assert_eq!(u.to_pfns(), ma.union(&mb).copied().collect::<Vec<_>>());
            let mut d = ba.clone();
            d.difference_with(&bb).unwrap();
            let md: Vec<u64> = ma.difference(&mb).copied().collect();
            prop_assert_eq!(d.to_pfns(), md.clone());
            prop_assert_eq!(ba.count_difference(&bb).unwrap(), md.len() as u64);
            let mut i = ba.clone();
            i.intersect_with(&bb).unwrap();
            prop_assert_eq!(i.to_pfns(), ma.intersection(&mb).copied().collect::<Vec<_>>());
            let mut c = ba.clone();
            for &p in &b {
                if p < len {
                    c.clear(p).unwrap();
                }
            }
            prop_assert_eq!(c.to_pfns(), md);
        }

        #[test]
        fn pfn_list_round_trip((len, a, _b) in arb()) {
            let m = model(len, &a);
            let r = DirtyBitmap::from_pfns(len, &a);
            if a.iter().all(|&p| p < len) {
                let b = r.unwrap();
                prop_assert_eq!(b.to_pfns(), m.iter().copied().collect::<Vec<_>>());
            } else {
                let bad = a.iter().copied().find(|&p| p >= len).unwrap();
                prop_assert_eq!(r.unwrap_err(), BitmapError::PfnOutOfRange { pfn: bad, len });
            }
        }

        #[test]
        fn xen_layout_round_trip((len, a, _b) in arb()) {
            let b = build(len, &a);
            let bytes = b.to_xen_bytes();
            prop_assert_eq!(bytes.len() as u64, len.div_ceil(8));
            for p in 0..len {
                let bit = bytes[(p / 8) as usize] >> (p % 8) & 1 == 1;
                prop_assert_eq!(bit, b.test(p).unwrap());
            }
            prop_assert_eq!(DirtyBitmap::from_xen_bytes(len, &bytes).unwrap(), b);
        }

        #[test]
        fn set_range_matches_model(len in 1u64..300, s in 0u64..300, e in 0u64..300) {
            let (s, e) = (s.min(len), e.min(len));
            let mut b = DirtyBitmap::new(len);
            b.set_range(s, e).unwrap();
            let want: Vec<u64> = (s..e).collect();
            prop_assert_eq!(b.to_pfns(), want);
        }
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let mut b = DirtyBitmap::new(10);
        assert_eq!(
            b.set(10),
            Err(BitmapError::PfnOutOfRange { pfn: 10, len: 10 })
        );
        assert!(b.test(u64::MAX).is_err());
        assert!(b.clear(11).is_err());
        assert!(b.set_range(5, 11).is_err());
        let other = DirtyBitmap::new(11);
        assert!(matches!(
            b.union_with(&other),
            Err(BitmapError::LengthMismatch { .. })
        ));
        assert!(matches!(
            DirtyBitmap::from_xen_bytes(100, &[0; 3]),
            Err(BitmapError::XenBufferTooShort { .. })
        ));
    }

    #[test]
    fn full_respects_tail_and_xen_tail_bits_are_ignored() {
        let b = DirtyBitmap::full(70);
        assert_eq!(b.count(), 70);
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![0..70]);
        let b = DirtyBitmap::from_xen_bytes(3, &[0xff]).unwrap();
        assert_eq!(b.to_pfns(), vec![0, 1, 2]);
    }
}
