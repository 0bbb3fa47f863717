//! Merkle tree over the encrypted chunks (SHA-256, domain-separated leaves and nodes). Its root is
//! in each device's signed manifest, so a device that knows the shared content key still cannot
//! forge chunks for the others: every chunk carries its proof, checked before decryption.
//!
//! leaf = SHA-256(0x00 || index u32 BE || ciphertext); node = SHA-256(0x01 || left || right).
//! A node without a sibling at some level is promoted unchanged (no duplication, so no
//! CVE-2012-2459-style ambiguity; the count is fixed by the signed manifest).

use crate::prelude::*;

use sha2::{Digest, Sha256};

/// Longest proof accepted (a u32 count needs at most 32 levels).
pub const MAX_PROOF_LEN: usize = 32;

/// Leaf hash.
pub fn leaf_hash(index: u32, ciphertext: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(index.to_be_bytes());
    h.update(ciphertext);
    h.finalize().into()
}

/// Interior node hash.
pub fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// A full tree, kept by the manager to hand out proofs.
#[derive(Debug, Clone)]
pub struct MerkleTree {
    levels: Vec<Vec<[u8; 32]>>,
}

impl MerkleTree {
    /// Build from leaf hashes. An empty tree has the all-zero root.
    pub fn from_leaves(leaves: Vec<[u8; 32]>) -> Self {
        let mut levels = vec![leaves];
        while levels.last().map(|l| l.len() > 1).unwrap_or(false) {
            let prev = levels.last().map(Vec::as_slice).unwrap_or_default();
            let next: Vec<[u8; 32]> = prev
                .chunks(2)
                .map(|p| {
                    if p.len() == 2 {
                        node_hash(&p[0], &p[1])
                    } else {
                        p[0]
                    }
                })
                .collect();
            levels.push(next);
        }
        Self { levels }
    }

    /// Root hash.
    pub fn root(&self) -> [u8; 32] {
        self.levels
            .last()
            .and_then(|l| l.first())
            .copied()
            .unwrap_or([0; 32])
    }

    /// Sibling hashes from the leaf up (levels without a sibling contribute nothing).
    pub fn proof(&self, index: u32) -> Vec<[u8; 32]> {
        let mut out = Vec::new();
        let mut i = index as usize;
        for level in &self.levels[..self.levels.len().saturating_sub(1)] {
            let sib = i ^ 1;
            if sib < level.len() {
                out.push(level[sib]);
            }
            i /= 2;
        }
        out
    }
}

/// Check that `leaf` at `index` of a `count`-leaf tree leads to `root` through `proof`.
pub fn verify_proof(
    root: &[u8; 32],
    index: u32,
    count: u32,
    leaf: [u8; 32],
    proof: &[[u8; 32]],
) -> bool {
    if index >= count || proof.len() > MAX_PROOF_LEN {
        return false;
    }
    let mut acc = leaf;
    let (mut i, mut n) = (u64::from(index), u64::from(count));
    let mut it = proof.iter();
    while n > 1 {
        if i % 2 == 1 {
            let Some(s) = it.next() else { return false };
            acc = node_hash(s, &acc);
        } else if i + 1 < n {
            let Some(s) = it.next() else { return false };
            acc = node_hash(&acc, s);
        }
        i /= 2;
        n = n.div_ceil(2);
    }
    it.next().is_none() && &acc == root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_for_every_size() {
        for count in 1u32..=17 {
            let leaves: Vec<_> = (0..count).map(|i| leaf_hash(i, &[i as u8; 3])).collect();
            let t = MerkleTree::from_leaves(leaves.clone());
            for i in 0..count {
                let p = t.proof(i);
                assert!(
                    verify_proof(&t.root(), i, count, leaves[i as usize], &p),
                    "{count} {i}"
                );
                // Wrong index, wrong leaf, truncated or extended proof all fail.
                assert!(
                    !verify_proof(
                        &t.root(),
                        (i + 1) % count.max(2),
                        count,
                        leaves[i as usize],
                        &p
                    ) || count == 1
                );
                assert!(!verify_proof(&t.root(), i, count, [9; 32], &p));
                if !p.is_empty() {
                    assert!(!verify_proof(
                        &t.root(),
                        i,
                        count,
                        leaves[i as usize],
                        &p[1..]
                    ));
                }
                let mut longer = p.clone();
                longer.push([0; 32]);
                assert!(!verify_proof(
                    &t.root(),
                    i,
                    count,
                    leaves[i as usize],
                    &longer
                ));
            }
            assert!(!verify_proof(
                &t.root(),
                count,
                count,
                leaves[0],
                &t.proof(0)
            ));
        }
    }

    #[test]
    fn leaf_and_node_are_domain_separated() {
        let l = leaf_hash(0, &[0u8; 60]);
        assert_ne!(l, node_hash(&[0; 32], &[0; 32]));
    }
}
