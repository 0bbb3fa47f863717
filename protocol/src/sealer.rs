//! Streaming preparation of a firmware image (encrypt once, chunk by chunk): a [`ChunkSealer`]
//! draws the campaign's fresh content key, takes the image's plaintext a batch of whole chunks at
//! a time, hands back each chunk's ciphertext for the caller to store (the operator writes them to
//! its cache directory), and keeps only what the manifest and the proofs need — the running
//! SHA-256 of the image and one 32-byte Merkle leaf per chunk. [`ChunkSealer::finish`] yields a
//! [`SealedFirmware`], from which chunk messages are built on demand out of the stored ciphertext
//! ([`SealedFirmware::chunk_payload`]). Neither holds the image or its ciphertext, so preparing
//! and serving a 1 GiB image costs the manager about 1 MiB of memory (leaves and tree). No I/O.

use crate::prelude::*;

use alloc::sync::Arc;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::{self, ChunkCipher, TAG_LEN};
use crate::error::ProtocolError;
use crate::merkle::{leaf_hash, MerkleTree};
use crate::topics::validate_id;
use crate::wire::{self, ChunkMsg};

/// Batches smaller than this are sealed on the calling thread alone (spawning threads would cost
/// more than it saves).
const PARALLEL_MIN_BYTES: usize = 256 * 1024;
/// Most threads a batch is sealed on. The SHA-256 of the image is one sequential chain of about a
/// third of the work, so beyond ~3 threads the others only wait for it.
pub const MAX_PREPARE_THREADS: usize = 4;

/// Encrypts an image chunk by chunk under a fresh random content key (see the module doc).
pub struct ChunkSealer {
    stream_id: String,
    content_key: Zeroizing<[u8; 32]>,
    cipher: ChunkCipher,
    chunk_size: u32,
    image_size: u64,
    count: u32,
    next: u32,
    image_hash: Sha256,
    leaves: Vec<[u8; 32]>,
    threads: usize,
}

impl core::fmt::Debug for ChunkSealer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ChunkSealer")
            .field("stream_id", &self.stream_id)
            .field("chunk_size", &self.chunk_size)
            .field("image_size", &self.image_size)
            .field("sealed", &self.next)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl ChunkSealer {
    /// A sealer for an image of `image_size` bytes in chunks of `chunk_size`, published under
    /// `stream_id` (the campaign id; chunk topics, nonces' AAD and chunk messages carry it). Draws
    /// the content key: fresh per sealer, which is what makes index-derived chunk nonces safe.
    pub fn new(stream_id: &str, chunk_size: u32, image_size: u64) -> Result<Self, ProtocolError> {
        let invalid = |m: String| ProtocolError::InvalidCampaign(m);
        validate_id(stream_id).map_err(|e| invalid(e.to_string()))?;
        if chunk_size == 0 || chunk_size > wire::MAX_CHUNK_SIZE {
            return Err(invalid(format!(
                "chunk size {chunk_size} outside 1..={}",
                wire::MAX_CHUNK_SIZE
            )));
        }
        let count = image_size.div_ceil(u64::from(chunk_size));
        if count == 0 {
            return Err(invalid("empty image".into()));
        }
        if count > u64::from(wire::MAX_CHUNK_COUNT) {
            return Err(invalid(format!(
                "{count} chunks exceed {}: use a larger chunk size",
                wire::MAX_CHUNK_COUNT
            )));
        }
        let content_key = Zeroizing::new(crypto::random::<32>());
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(MAX_PREPARE_THREADS);
        Ok(Self {
            stream_id: stream_id.to_owned(),
            cipher: ChunkCipher::new(&content_key),
            content_key,
            chunk_size,
            image_size,
            count: count as u32,
            next: 0,
            image_hash: Sha256::new(),
            leaves: Vec::with_capacity(count as usize),
            threads,
        })
    }

    /// Seal under `content_key` instead of the fresh one drawn by [`ChunkSealer::new`]: several
    /// manager replicas that must publish the same chunks derive it from the campaign's secret seed
    /// with [`crypto::seeded_content_key`], bound to this exact image's SHA-256, so that one key
    /// never encrypts two images (index-derived nonces). The caller checks after
    /// [`ChunkSealer::finish`] that the image it sealed has that digest.
    pub fn with_content_key(mut self, content_key: Zeroizing<[u8; 32]>) -> Self {
        self.cipher = ChunkCipher::new(&content_key);
        self.content_key = content_key;
        self
    }

    /// Seal on at most `threads` threads (at least 1); the output does not depend on it.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        self.count
    }

    /// Chunks sealed so far.
    pub fn sealed(&self) -> u32 {
        self.next
    }

    /// Plaintext bytes still expected.
    pub fn remaining(&self) -> u64 {
        self.image_size
            .saturating_sub(u64::from(self.next) * u64::from(self.chunk_size))
    }

    /// Seal the next chunks: `plaintext` holds whole chunks in index order (only the image's last
    /// chunk may be short), and their ciphertexts (each plaintext length + 16-byte tag, so chunk
    /// `i` sits at [`ciphertext_offset`]`(chunk_size, i)` of the concatenation) are appended to
    /// `out` in index order. A batch that is not whole chunks, or goes past the image, is refused
    /// and nothing is sealed.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let cs = self.chunk_size as usize;
        let remaining = self.remaining();
        let whole = plaintext.len() % cs == 0 || plaintext.len() as u64 == remaining;
        if plaintext.len() as u64 > remaining || !whole {
            return Err(ProtocolError::InvalidCampaign(format!(
                "a batch of {} bytes is not whole chunks of {cs} bytes within the {remaining} bytes still expected",
                plaintext.len()
            )));
        }
        let chunks: Vec<&[u8]> = plaintext.chunks(cs).collect();
        let first = self.next;
        let count = self.count;
        let (cipher, id) = (&self.cipher, self.stream_id.as_str());
        let seal_range = |range: core::ops::Range<usize>| {
            let mut cts = Vec::with_capacity(
                chunks[range.clone()]
                    .iter()
                    .map(|c| c.len() + TAG_LEN)
                    .sum(),
            );
            let mut leaves = Vec::with_capacity(range.len());
            for i in range {
                let index = first + i as u32;
                let start = cts.len();
                cipher.encrypt_into(id, index, count, chunks[i], &mut cts);
                leaves.push(leaf_hash(index, &cts[start..]));
            }
            (cts, leaves)
        };
        let threads = if plaintext.len() < PARALLEL_MIN_BYTES {
            1
        } else {
            self.threads.min(chunks.len()).max(1)
        };
        let per = chunks.len().div_ceil(threads);
        let ranges: Vec<_> = (0..threads)
            .map(|t| (t * per).min(chunks.len())..((t + 1) * per).min(chunks.len()))
            .collect();
        let image_hash = &mut self.image_hash;
        let parts: Vec<(Vec<u8>, Vec<[u8; 32]>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = ranges[1..]
                .iter()
                .map(|r| {
                    let r = r.clone();
                    scope.spawn(move || seal_range(r))
                })
                .collect();
            // The image digest is one sequential chain: hash here while the others seal.
            image_hash.update(plaintext);
            let mut parts = vec![seal_range(ranges[0].clone())];
            for w in workers {
                // A worker panics only on a bug: propagate it.
                parts.push(w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
            parts
        });
        for (cts, leaves) in parts {
            out.extend_from_slice(&cts);
            self.leaves.extend(leaves);
        }
        self.next += chunks.len() as u32;
        Ok(())
    }

    /// Every chunk sealed: build the Merkle tree. Refused while chunks are missing.
    pub fn finish(self) -> Result<SealedFirmware, ProtocolError> {
        if self.next != self.count {
            return Err(ProtocolError::InvalidCampaign(format!(
                "only {} of {} chunks were sealed",
                self.next, self.count
            )));
        }
        Ok(SealedFirmware {
            stream_id: self.stream_id,
            content_key: self.content_key,
            chunk_size: self.chunk_size,
            size: self.image_size,
            sha256: self.image_hash.finalize().into(),
            count: self.count,
            tree: Arc::new(MerkleTree::from_leaves(self.leaves)),
        })
    }
}

/// Where chunk `index`'s ciphertext starts in the concatenation [`ChunkSealer::seal`] produced.
pub fn ciphertext_offset(chunk_size: u32, index: u32) -> u64 {
    u64::from(index) * (u64::from(chunk_size) + TAG_LEN as u64)
}

/// A sealed image: what the manifest says about it (size, SHA-256, chunking, Merkle root), its
/// content key, and the tree that proves each chunk. The ciphertext itself is the caller's.
#[derive(Clone)]
pub struct SealedFirmware {
    stream_id: String,
    content_key: Zeroizing<[u8; 32]>,
    chunk_size: u32,
    size: u64,
    sha256: [u8; 32],
    count: u32,
    tree: Arc<MerkleTree>,
}

impl core::fmt::Debug for SealedFirmware {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SealedFirmware")
            .field("stream_id", &self.stream_id)
            .field("size", &self.size)
            .field("chunk_count", &self.count)
            .field("content_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl SealedFirmware {
    /// Seal a whole image held in memory: the sealer and the ciphertexts, concatenated.
    pub fn seal_all(
        stream_id: &str,
        chunk_size: u32,
        image: &[u8],
    ) -> Result<(Self, Vec<u8>), ProtocolError> {
        let mut sealer = ChunkSealer::new(stream_id, chunk_size, image.len() as u64)?;
        let mut cts = Vec::with_capacity(image.len() + sealer.chunk_count() as usize * TAG_LEN);
        sealer.seal(image, &mut cts)?;
        Ok((sealer.finish()?, cts))
    }

    /// The id chunk topics and messages carry.
    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }
    /// Plaintext bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// SHA-256 of the plaintext.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }
    /// Plaintext chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }
    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        self.count
    }
    /// Merkle root over the encrypted chunks.
    pub fn merkle_root(&self) -> [u8; 32] {
        self.tree.root()
    }
    pub(crate) fn content_key(&self) -> &[u8; 32] {
        &self.content_key
    }

    /// Ciphertext length of chunk `index` (plaintext + tag; 0 beyond the count).
    pub fn ciphertext_len(&self, index: u32) -> usize {
        if index >= self.count {
            return 0;
        }
        let start = u64::from(index) * u64::from(self.chunk_size);
        let plain = self
            .size
            .saturating_sub(start)
            .min(u64::from(self.chunk_size));
        plain as usize + TAG_LEN
    }

    /// Where chunk `index`'s ciphertext starts in the sealer's concatenation.
    pub fn ciphertext_offset(&self, index: u32) -> u64 {
        ciphertext_offset(self.chunk_size, index)
    }

    /// Total ciphertext bytes (the size of the concatenation).
    pub fn ciphertext_total(&self) -> u64 {
        self.size + u64::from(self.count) * TAG_LEN as u64
    }

    /// The chunk message of `index` around its stored ciphertext: the CBOR head, the ciphertext,
    /// the Merkle proof. `None` when the index is out of range or `ct` has the wrong length (a
    /// truncated cache file): nothing malformed is ever published.
    pub fn chunk_payload(&self, index: u32, ct: &[u8]) -> Option<Vec<u8>> {
        if index >= self.count || ct.len() != self.ciphertext_len(index) {
            return None;
        }
        let bound =
            wire::chunk_payload_bound(&self.stream_id, u64::from(self.chunk_size), self.count);
        let mut payload = Vec::with_capacity(usize::try_from(bound).unwrap_or(usize::MAX));
        ChunkMsg::encode_head(&mut payload, &self.stream_id, index, self.count, ct.len());
        payload.extend_from_slice(ct);
        ChunkMsg::encode_tail(&mut payload, &self.tree.proof(index));
        Some(payload)
    }

    /// Opens one of this image's chunk messages as a device does (decode, proof, decrypt):
    /// `(index, plaintext)`. For checks and benchmarks on the manager's side, which holds the
    /// content key anyway.
    pub fn open_chunk_payload(
        &self,
        payload: &[u8],
    ) -> Result<(u32, Zeroizing<Vec<u8>>), ProtocolError> {
        let c = wire::decode_chunk(payload)?;
        if c.campaign_id != self.stream_id {
            return Err(ProtocolError::WrongCampaign {
                expected: self.stream_id.clone(),
                got: c.campaign_id,
            });
        }
        if c.index >= self.count || c.count != self.count {
            return Err(ProtocolError::ChunkOutOfRange {
                index: c.index,
                count: self.count,
            });
        }
        c.open(&self.content_key, &self.merkle_root())
            .map(|plain| (c.index, plain))
    }

    /// Bytes of chunk `index`'s message (what publishing it once costs), without building it.
    pub fn chunk_payload_len(&self, index: u32) -> usize {
        let mut head = Vec::with_capacity(96);
        let ct_len = self.ciphertext_len(index);
        ChunkMsg::encode_head(&mut head, &self.stream_id, index, self.count, ct_len);
        let mut tail = Vec::with_capacity(8 + 34 * 32);
        ChunkMsg::encode_tail(&mut tail, &self.tree.proof(index));
        head.len() + ct_len + tail.len()
    }
}

#[cfg(test)]
mod tests {
    //! Sealing against a plain reference built from the one-shot primitives.
    use super::*;
    use crate::codec::encode;
    use crate::WIRE_VERSION;

    /// Chunk messages and root the one-shot primitives (pinned by the test vectors) give.
    fn reference(key: &[u8; 32], id: &str, image: &[u8], chunk: usize) -> (Vec<Vec<u8>>, [u8; 32]) {
        let count = image.len().div_ceil(chunk) as u32;
        let cts: Vec<Vec<u8>> = image
            .chunks(chunk)
            .enumerate()
            .map(|(i, p)| crypto::encrypt_chunk(key, id, i as u32, count, p))
            .collect();
        let tree = MerkleTree::from_leaves(
            cts.iter()
                .enumerate()
                .map(|(i, ct)| leaf_hash(i as u32, ct))
                .collect(),
        );
        let payloads = cts
            .into_iter()
            .enumerate()
            .map(|(i, ct)| {
                encode(&ChunkMsg {
                    v: WIRE_VERSION,
                    campaign_id: id.into(),
                    index: i as u32,
                    count,
                    ct,
                    proof: tree.proof(i as u32),
                })
            })
            .collect();
        (payloads, tree.root())
    }

    #[test]
    fn sealing_in_any_batches_on_any_threads_matches_the_reference() {
        let image: Vec<u8> = (0..600_001usize).map(|i| (i * 7 % 253) as u8).collect();
        for (len, chunk) in [
            (1usize, 1024usize),
            (1000, 1000),
            (1001, 1000),
            (300_001, 65_536),
            (600_001, 4096),
            (70_000, 7),
        ] {
            let image = &image[..len];
            for threads in [1, 2, 3, 8] {
                for batch_chunks in [1, 3, 64, usize::MAX] {
                    let mut sealer = ChunkSealer::new("camp-1", chunk as u32, len as u64)
                        .unwrap()
                        .with_threads(threads);
                    let key = *sealer.content_key;
                    let mut cts = Vec::new();
                    let step = chunk.saturating_mul(batch_chunks).min(len);
                    for batch in image.chunks(step) {
                        sealer.seal(batch, &mut cts).unwrap();
                    }
                    let sealed = sealer.finish().unwrap();
                    let (want, root) = reference(&key, "camp-1", image, chunk);
                    let what = format!("{len}/{chunk} x{threads} batches of {batch_chunks}");
                    assert_eq!(sealed.merkle_root(), root, "{what}");
                    assert_eq!(sealed.sha256(), crypto::sha256(image), "{what}");
                    assert_eq!(cts.len() as u64, sealed.ciphertext_total(), "{what}");
                    for (i, w) in want.iter().enumerate() {
                        let i = i as u32;
                        let off = sealed.ciphertext_offset(i) as usize;
                        let ct = &cts[off..off + sealed.ciphertext_len(i)];
                        let got = sealed.chunk_payload(i, ct).unwrap();
                        assert!(&got == w, "{what}: chunk {i}");
                        assert_eq!(sealed.chunk_payload_len(i), w.len());
                        // Sized for its whole message: no regrowth.
                        assert!(
                            got.capacity() as u64
                                <= wire::chunk_payload_bound(
                                    "camp-1",
                                    chunk as u64,
                                    want.len() as u32
                                )
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn batches_must_be_whole_chunks_within_the_image_and_all_of_it() {
        let mut s = ChunkSealer::new("c", 10, 25).unwrap();
        let mut out = Vec::new();
        assert!(s.seal(&[0; 15], &mut out).is_err(), "half a chunk");
        assert!(s.seal(&[0; 30], &mut out).is_err(), "past the image");
        assert!(out.is_empty() && s.sealed() == 0);
        s.seal(&[0; 20], &mut out).unwrap();
        assert_eq!(s.remaining(), 5);
        let unfinished = ChunkSealer::new("c", 10, 25).unwrap();
        assert!(unfinished.finish().is_err());
        s.seal(&[0; 5], &mut out).unwrap();
        let sealed = s.finish().unwrap();
        assert_eq!(sealed.chunk_count(), 3);
        assert_eq!(sealed.ciphertext_len(2), 5 + TAG_LEN);
        // A stored ciphertext of the wrong length is never framed.
        assert!(sealed.chunk_payload(2, &out[..3]).is_none());
        assert!(sealed.chunk_payload(3, &[]).is_none());
        assert!(ChunkSealer::new("c", 10, 0).is_err());
        assert!(ChunkSealer::new("C!", 10, 1).is_err());
        assert!(ChunkSealer::new("c", 0, 1).is_err());
    }

    #[test]
    fn every_sealer_draws_its_own_content_key() {
        let a = ChunkSealer::new("c", 10, 25).unwrap();
        let b = ChunkSealer::new("c", 10, 25).unwrap();
        assert_ne!(*a.content_key, *b.content_key);
    }

    #[test]
    fn chunk_messages_open_to_the_image_and_a_changed_byte_is_refused() {
        let image: Vec<u8> = (0..2500u32).map(|i| (i * 7) as u8).collect();
        let (sealed, cts) = SealedFirmware::seal_all("c", 1000, &image).unwrap();
        let mut opened = Vec::new();
        for index in 0..sealed.chunk_count() {
            let start = sealed.ciphertext_offset(index) as usize;
            let ct = &cts[start..start + sealed.ciphertext_len(index)];
            let payload = sealed.chunk_payload(index, ct).unwrap();
            let (i, plain) = sealed.open_chunk_payload(&payload).unwrap();
            assert_eq!(i, index);
            opened.extend_from_slice(&plain);
            // Any changed ciphertext byte fails the proof before any decryption.
            let mut changed = payload.clone();
            let at = payload.len() / 2;
            changed[at] ^= 1;
            assert!(sealed.open_chunk_payload(&changed).is_err());
        }
        assert_eq!(opened, image);
        let (other, other_cts) = SealedFirmware::seal_all("d", 1000, &image).unwrap();
        let foreign = other
            .chunk_payload(0, &other_cts[..other.ciphertext_len(0)])
            .unwrap();
        assert!(matches!(
            sealed.open_chunk_payload(&foreign),
            Err(ProtocolError::WrongCampaign { .. })
        ));
    }
}
