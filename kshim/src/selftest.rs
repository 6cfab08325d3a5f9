//! Verifiable payload content for load generators and sinks (like LNet selftest's
//! patterns): byte `i` of the message with seed `s` is a function of `(s, i)` only,
//! so a sink that knows the seed (carried in the LNet header's `hdr_data`) checks
//! every byte without having seen the sender's buffer.

/// The pattern byte at offset `i` of the message with seed `seed`.
#[inline]
pub fn byte(seed: u64, i: usize) -> u8 {
    let x = seed ^ ((i as u64) >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> ((i & 7) * 8)) as u8
}

/// Fills `out` with the pattern bytes `offset..offset + out.len()` of `seed`.
pub fn fill(seed: u64, offset: usize, out: &mut [u8]) {
    for (k, b) in out.iter_mut().enumerate() {
        *b = byte(seed, offset + k);
    }
}

/// The first offset in `data` (holding bytes `offset..`) that differs from the
/// pattern, if any.
pub fn check(seed: u64, offset: usize, data: &[u8]) -> Option<usize> {
    data.iter()
        .enumerate()
        .find(|&(k, &b)| b != byte(seed, offset + k))
        .map(|(k, _)| offset + k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_changes_and_differs_between_seeds() {
        let mut a = vec![0u8; 4096];
        fill(7, 0, &mut a);
        assert_eq!(check(7, 0, &a), None);
        assert_eq!(check(7, 100, &a[100..]), None);
        let mut b = a.clone();
        b[1234] ^= 1;
        assert_eq!(check(7, 0, &b), Some(1234));
        let mut c = vec![0u8; 4096];
        fill(8, 0, &mut c);
        let same = a.iter().zip(&c).filter(|(x, y)| x == y).count();
        assert!(same < 100, "{same} equal bytes between seeds");
        // Not constant across offsets.
        assert!(a.windows(2).filter(|w| w[0] == w[1]).count() < 100);
    }
}
