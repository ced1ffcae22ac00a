//! Gather permutations. A permutation `p` of length n stands for the matrix P with
//! `P[j, p[j]] = 1`, so `(P v)[j] = v[p[j]]`.

/// True when `p` holds every index `0..p.len()` exactly once.
pub fn is_permutation(p: &[u32]) -> bool {
    let mut seen = vec![false; p.len()];
    for &x in p {
        let x = x as usize;
        if x >= seen.len() || seen[x] {
            return false;
        }
        seen[x] = true;
    }
    true
}

/// True when `d` is a multiple of `2^k`, for any `k` (no shift that could pass the word size:
/// a factor count read from a file can be anything).
pub fn multiple_of_pow2(d: usize, k: usize) -> bool {
    d == 0 || d.trailing_zeros() as usize >= k
}

/// `2^k` as text, exact for any `k`, for messages.
pub fn pow2_text(k: usize) -> String {
    match u32::try_from(k).ok().and_then(|k| 1u64.checked_shl(k)) {
        Some(v) if k < 64 => v.to_string(),
        _ => format!("2^{k}"),
    }
}

/// The inverse permutation.
pub fn invert(p: &[u32]) -> Vec<u32> {
    let mut inv = vec![0u32; p.len()];
    for (j, &x) in p.iter().enumerate() {
        inv[x as usize] = j as u32;
    }
    inv
}

/// Whether `p` leaves every index in place.
pub fn is_identity(p: &[u32]) -> bool {
    p.iter().enumerate().all(|(j, &x)| j as u32 == x)
}

/// PEFT BOFT's permutation for butterfly factor `i` (0-based) over n indices with block size h:
/// every chunk of `h·2^i` indices is cut into half-blocks of h/2; the even-numbered half-blocks
/// are listed first, then the odd-numbered ones. Factor 0 is the identity.
/// LyCORIS boft's gather order of stage i (`functional/boft._diff_weight`'s regrouping): for each
/// group of `2k` rows (`k = 2^i·h/2`), rows `g·2k + c·k + a` for a in 0..k, c in 0..2 with c
/// varying fastest. Stage 0 is not the identity (h = 4: `0 2 1 3`).
pub fn lycoris_boft(n: usize, h: usize, i: usize) -> Vec<u32> {
    let k = (h / 2) << i;
    let mut p = Vec::with_capacity(n);
    for g in 0..n / (2 * k) {
        for a in 0..k {
            for c in 0..2 {
                p.push((g * 2 * k + c * k + a) as u32);
            }
        }
    }
    p
}

/// PEFT BOFT's butterfly permutation of factor `i` for `n` elements in blocks of `h` (PEFT's `p_i`).
pub fn peft_boft(n: usize, h: usize, i: usize) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    if i == 0 {
        return p;
    }
    let half = h / 2;
    let chunk = h << i;
    let halves = chunk / half;
    for base in (0..n).step_by(chunk) {
        let order = (0..halves).step_by(2).chain((1..halves).step_by(2));
        for (slot, hb) in order.enumerate() {
            for a in 0..half {
                p[base + slot * half + a] = (base + hb * half + a) as u32;
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_examples_from_the_reference() {
        assert_eq!(
            peft_boft(16, 4, 1),
            vec![0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
        );
        assert_eq!(
            peft_boft(16, 4, 2),
            vec![0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]
        );
        assert_eq!(
            peft_boft(12, 6, 1),
            vec![0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]
        );
        assert!(is_identity(&peft_boft(12, 6, 0)));
    }

    #[test]
    fn inverse_composes_to_identity() {
        let p = peft_boft(64, 8, 2);
        assert!(is_permutation(&p));
        let inv = invert(&p);
        let comp: Vec<u32> = (0..64).map(|j| p[inv[j] as usize]).collect();
        assert!(is_identity(&comp));
        assert!(!is_permutation(&[0, 0, 1]));
        assert!(!is_permutation(&[0, 3, 1]));
    }

    #[test]
    fn powers_of_two_past_the_word_size() {
        assert!(multiple_of_pow2(8, 3) && !multiple_of_pow2(8, 4));
        assert!(!multiple_of_pow2(1 << 40, 99) && !multiple_of_pow2(usize::MAX, 1));
        assert_eq!(pow2_text(3), "8");
        assert_eq!(pow2_text(99), "2^99");
    }
}
