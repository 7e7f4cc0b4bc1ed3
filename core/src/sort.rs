//! A small in-place heap sort for the two lists idemgate sorts (an object's member names for
//! canonical JSON, a configuration block's field names to find duplicates).
//!
//! `slice::sort*` is faster on long inputs but brings 7–15 kB of wasm (two quicksorts, drift
//! sort, small-sort networks) into both modules; these lists are short, and a heap sort is
//! O(n log n) on any input, without allocating. It is not stable: sort `(key, index)` pairs
//! where order among equals matters.
//!
//! ```
//! let mut v = [3, 1, 2];
//! idemgate_core::sort::sort_by(&mut v, |a, b| a < b);
//! assert_eq!(v, [1, 2, 3]);
//! ```

/// Sorts `v` ascending by `less` (a strict weak order: `less(a, b)` when `a` goes first).
pub fn sort_by<T>(v: &mut [T], mut less: impl FnMut(&T, &T) -> bool) {
    let n = v.len();
    for root in (0..n / 2).rev() {
        sift_down(v, root, n, &mut less);
    }
    for end in (1..n).rev() {
        v.swap(0, end);
        sift_down(v, 0, end, &mut less);
    }
}

/// Moves `v[root]` down the max-heap `v[..end]` until both children are not greater.
fn sift_down<T>(v: &mut [T], mut root: usize, end: usize, less: &mut impl FnMut(&T, &T) -> bool) {
    loop {
        let left = 2 * root + 1;
        if left >= end {
            return;
        }
        let right = left + 1;
        let child = match (v.get(left), v.get(right)) {
            (Some(l), Some(r)) if right < end && less(l, r) => right,
            _ => left,
        };
        match (v.get(root), v.get(child)) {
            (Some(a), Some(b)) if less(a, b) => v.swap(root, child),
            _ => return,
        }
        root = child;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn sorts_like_std(mut v in proptest::collection::vec(any::<u16>(), 0..300)) {
            let mut want = v.clone();
            want.sort();
            sort_by(&mut v, |a, b| a < b);
            prop_assert_eq!(v, want);
        }

        #[test]
        fn pairs_with_their_index_sort_stably(v in proptest::collection::vec(0u8..4, 0..100)) {
            let mut pairs: Vec<(u8, usize)> = v.iter().copied().zip(0..).collect();
            let mut want = pairs.clone();
            want.sort_by_key(|p| p.0); // std's stable sort
            sort_by(&mut pairs, |a, b| (a.0, a.1) < (b.0, b.1));
            prop_assert_eq!(pairs, want);
        }
    }

    #[test]
    fn edge_cases() {
        let mut empty: [u8; 0] = [];
        sort_by(&mut empty, |a, b| a < b);
        let mut one = [7];
        sort_by(&mut one, |a, b| a < b);
        assert_eq!(one, [7]);
        let mut desc: Vec<u32> = (0..1000).rev().collect();
        sort_by(&mut desc, |a, b| a < b);
        assert!(desc.windows(2).all(|w| w[0] <= w[1]));
        let mut same = [5; 33];
        sort_by(&mut same, |a, b| a < b);
        assert_eq!(same, [5; 33]);
    }
}
