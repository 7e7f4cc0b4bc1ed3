//! A map kept as a vector of pairs, for the filter's small per-VM tables (gate tokens,
//! metric ids, pending etcd calls: tens of entries, looked up by a few compares). It costs a
//! fraction of the wasm that `HashMap` (hashbrown + its hasher) does.
use std::borrow::Borrow;

/// Insertion-ordered map with linear lookups.
#[derive(Debug, Clone)]
pub struct VecMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K: PartialEq, V> VecMap<K, V> {
    /// An empty map.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Sets `key` to `value`, returning the previous value.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => Some(std::mem::replace(v, value)),
            None => {
                self.0.push((key, value));
                None
            }
        }
    }

    /// The value of `key`.
    pub fn get<Q: PartialEq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.0
            .iter()
            .find(|(k, _)| k.borrow() == key)
            .map(|(_, v)| v)
    }

    /// The values, mutable, in insertion order.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.0.iter_mut().map(|(_, v)| v)
    }

    /// The entries, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// The values, in insertion order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    /// Removes `key`, returning its value.
    pub fn remove<Q: PartialEq + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let i = self.0.iter().position(|(k, _)| k.borrow() == key)?;
        Some(self.0.swap_remove(i).1)
    }
}

#[cfg(test)]
mod tests {
    use super::VecMap;

    #[test]
    fn insert_get_remove() {
        let mut m: VecMap<&'static str, u32> = VecMap::new();
        assert_eq!(m.insert("a", 1), None);
        assert_eq!(m.insert("b", 2), None);
        assert_eq!(m.insert("a", 3), Some(1));
        assert_eq!(m.get("a"), Some(&3));
        assert_eq!(m.get("c"), None);
        assert_eq!(m.remove("a"), Some(3));
        assert_eq!(m.remove("a"), None);
        assert_eq!(m.get("b"), Some(&2));
        let mut n: VecMap<u64, u32> = VecMap::default();
        for i in 0..100 {
            n.insert(i, i as u32 * 2);
        }
        for i in (0..100).step_by(3) {
            assert_eq!(n.remove(&i), Some(i as u32 * 2));
        }
        assert_eq!(n.0.len(), 66);
        assert_eq!(n.get(&4), Some(&8));
        assert_eq!(n.get(&3), None);
    }
}
