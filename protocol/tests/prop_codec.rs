//! Property tests for the pure pieces: Merkle proofs, topic build/parse, bounded decoders.

use proptest::prelude::*;
use sealed_ota_protocol::merkle::{leaf_hash, verify_proof, MerkleTree};
use sealed_ota_protocol::wire::{sample, Decoder};
use sealed_ota_protocol::{TopicKind, TopicTree};

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn merkle_proofs_verify_only_for_their_leaf(count in 1u32..600, pick in any::<u32>(), other in any::<u32>()) {
        let leaves: Vec<[u8; 32]> = (0..count).map(|i| leaf_hash(i, &i.to_le_bytes())).collect();
        let t = MerkleTree::from_leaves(leaves.clone());
        let i = pick % count;
        let p = t.proof(i);
        prop_assert!(p.len() <= 10);
        prop_assert!(verify_proof(&t.root(), i, count, leaves[i as usize], &p));
        let j = other % count;
        if j != i {
            prop_assert!(!verify_proof(&t.root(), j, count, leaves[i as usize], &p));
            prop_assert!(!verify_proof(&t.root(), i, count, leaves[j as usize], &p));
        }
        // A different declared count never validates a proof made for this tree.
        if count > 1 {
            prop_assert!(!verify_proof(&t.root(), i, count * 2 + 1, leaves[i as usize], &p));
        }
    }

    #[test]
    fn topics_round_trip(dev in "[a-z0-9-]{1,63}", camp in "[a-z0-9-]{1,63}", idx in any::<u32>(), prefix in "[a-z]{1,8}(/[a-z]{1,8}){0,2}") {
        let t = TopicTree::new(&prefix, "mgr").unwrap();
        prop_assert_eq!(t.parse(&t.notify(&dev)).unwrap(), TopicKind::Notify { device: dev.clone() });
        prop_assert_eq!(t.parse(&t.ready(&dev)).unwrap(), TopicKind::Ready { device: dev.clone() });
        prop_assert_eq!(t.parse(&t.update(&dev)).unwrap(), TopicKind::Update { device: dev.clone() });
        prop_assert_eq!(t.parse(&t.status(&dev)).unwrap(), TopicKind::Status { device: dev.clone() });
        prop_assert_eq!(t.parse(&t.chunk(&camp, idx)).unwrap(), TopicKind::Chunk { campaign: camp.clone(), index: idx });
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        for d in Decoder::ALL {
            let _ = d.decode(&bytes);
        }
    }

    #[test]
    fn decoders_never_panic_on_mutated_samples(which in 0usize..8, edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let d = Decoder::ALL[which];
        let mut s = sample(d);
        for (pos, val) in edits {
            let n = s.len();
            s[pos % n] = val;
        }
        let _ = d.decode(&s);
    }
}
