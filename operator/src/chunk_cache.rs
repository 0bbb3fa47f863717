//! The operator's cache directory (an emptyDir or PVC in the chart, `--cache-dir`): per campaign
//! uid a directory with the downloaded image (`image`, removed once sealed) and its ciphertext
//! (`chunks`: every chunk's ciphertext, concatenated in index order), so the operator never holds
//! a whole image in memory. Sealing reads the image a batch of whole chunks at a time (about
//! 4 MiB) through the protocol's [`ChunkSealer`]; serving reads one chunk's ciphertext back with a
//! positioned read. A campaign's directory goes when its [`ChunkFile`] is dropped (the run ended);
//! the whole cache is emptied when the operator starts (it prepares every campaign again).
//! Blocking file I/O: call it from `spawn_blocking`.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sealed_ota_protocol::{ChunkSealer, ProtocolError, SealedFirmware};
use zeroize::Zeroizing;

/// Plaintext read per sealing batch (rounded to whole chunks).
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// What went wrong in the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file of the cache could not be created, read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The image cannot be sealed (empty, too many chunks, ...).
    #[error("{0}")]
    Seal(#[from] ProtocolError),
    /// The delta from a base image could not be made.
    #[error("{0}")]
    Delta(#[from] sealed_ota_protocol::delta::DeltaError),
    /// The image file is shorter than its size said (it changed while being read).
    #[error("the image ended after {read} of {expected} bytes")]
    Truncated {
        /// Bytes read.
        read: u64,
        /// Bytes expected.
        expected: u64,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The cache directory.
#[derive(Clone, Debug)]
pub struct CacheDir {
    root: PathBuf,
}

impl CacheDir {
    /// Open (create) the cache at `root` and empty it: a starting operator prepares every campaign
    /// again, so nothing in it is of use any more.
    pub fn open(root: &Path) -> Result<Self, CacheError> {
        std::fs::create_dir_all(root).map_err(io("creating the cache directory", root))?;
        let entries = std::fs::read_dir(root).map_err(io("reading the cache directory", root))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(io("emptying the cache directory", &path))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// A fresh directory for one preparation of campaign `uid` (whatever an earlier preparation
    /// left there is removed).
    pub fn campaign(&self, uid: &str) -> Result<CampaignFiles, CacheError> {
        let dir = self.root.join(uid);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("removing", &dir))?;
        }
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        Ok(CampaignFiles { dir })
    }
}

/// One campaign's directory while it is being prepared.
#[derive(Debug)]
pub struct CampaignFiles {
    dir: PathBuf,
}

impl CampaignFiles {
    /// Where the plaintext image is downloaded to.
    pub fn image_path(&self) -> PathBuf {
        self.dir.join("image")
    }

    /// Store an image that is already in memory (a ConfigMap or Secret key).
    pub fn write_image(&self, bytes: &[u8]) -> Result<(), CacheError> {
        let path = self.image_path();
        std::fs::write(&path, bytes).map_err(io("writing", &path))
    }

    /// Replace the stored image (the base of a delta) with the delta from it to the image at
    /// `target` (zstd `--patch-from`, [`sealed_ota_protocol::delta`]). Both images are mapped
    /// from their files, not read: their pages are the kernel's page cache (evictable, shared),
    /// so the operator's own memory grows by zstd's bounded tables, not by the images. The delta
    /// is written beside the base and then takes its name. Returns the delta's size and SHA-256.
    pub fn replace_with_delta(&self, target: &Path) -> Result<(u64, [u8; 32]), CacheError> {
        let path = self.image_path();
        let delta_path = self.dir.join("delta");
        let base = map(&path)?;
        let target_map = map(target)?;
        let out = File::create(&delta_path).map_err(io("creating", &delta_path))?;
        let mut out = HashingWriter {
            inner: BufWriter::new(out),
            hasher: sha2::Sha256::default(),
            written: 0,
        };
        sealed_ota_protocol::delta::make_to(&base, &target_map, &mut out)?;
        out.inner.flush().map_err(io("writing", &delta_path))?;
        drop((base, target_map));
        std::fs::rename(&delta_path, &path).map_err(io("renaming", &delta_path))?;
        use sha2::Digest as _;
        Ok((out.written, out.hasher.finalize().into()))
    }

    /// Seal the stored image chunk by chunk under `stream_id` (the campaign id) into the chunk
    /// file, then remove the plaintext, under `content_key` (derived from the campaign's seed for
    /// this image: every replica seals the same chunks) or a fresh random key. Returns the sealed
    /// description and the chunk file.
    pub fn seal(
        self,
        stream_id: &str,
        chunk_size: u32,
        content_key: Option<Zeroizing<[u8; 32]>>,
    ) -> Result<(SealedFirmware, ChunkFile), CacheError> {
        let image_path = self.image_path();
        let chunks_path = self.dir.join("chunks");
        let mut image = File::open(&image_path).map_err(io("opening", &image_path))?;
        let size = image
            .metadata()
            .map_err(io("reading the size of", &image_path))?
            .len();
        let mut sealer = ChunkSealer::new(stream_id, chunk_size, size)?;
        if let Some(key) = content_key {
            sealer = sealer.with_content_key(key);
        }
        let batch_len = (BATCH_BYTES / chunk_size as usize).max(1) * chunk_size as usize;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&chunks_path)
            .map_err(io("creating", &chunks_path))?;
        let mut out = BufWriter::new(file);
        let mut plain = vec![0u8; batch_len];
        let mut sealed_ct = Vec::with_capacity(batch_len + batch_len / chunk_size as usize * 16);
        while sealer.remaining() > 0 {
            let want = (sealer.remaining()).min(batch_len as u64) as usize;
            read_full(&mut image, &mut plain[..want]).map_err(|e| match e {
                ReadFull::Io(source) => CacheError::Io {
                    action: "reading",
                    path: image_path.clone(),
                    source,
                },
                ReadFull::Short(got) => CacheError::Truncated {
                    read: size - sealer.remaining() + got as u64,
                    expected: size,
                },
            })?;
            sealed_ct.clear();
            sealer.seal(&plain[..want], &mut sealed_ct)?;
            out.write_all(&sealed_ct)
                .map_err(io("writing", &chunks_path))?;
        }
        let file = out.into_inner().map_err(|e| CacheError::Io {
            action: "writing",
            path: chunks_path.clone(),
            source: e.into_error(),
        })?;
        drop(image);
        std::fs::remove_file(&image_path).map_err(io("removing", &image_path))?;
        let sealed = sealer.finish()?;
        Ok((
            sealed.clone(),
            ChunkFile {
                file,
                dir: self.dir,
                sealed,
            },
        ))
    }
}

/// Counts and hashes what passes to `inner`.
struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

enum ReadFull {
    Io(std::io::Error),
    Short(usize),
}

/// Maps a cached image read-only. The cache directory is the operator's own (no other process
/// writes its files while a campaign is prepared), which is what makes the mapping sound.
#[allow(unsafe_code)]
fn map(path: &Path) -> Result<memmap2::Mmap, CacheError> {
    let file = File::open(path).map_err(io("opening", path))?;
    // SAFETY: the file is in this operator's private cache directory and is neither truncated nor
    // written while mapped (the delta goes to another file and is renamed after the maps drop).
    unsafe { memmap2::Mmap::map(&file) }.map_err(io("mapping", path))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ReadFull> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(ReadFull::Short(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadFull::Io(e)),
        }
    }
    Ok(())
}

/// A sealed campaign's chunk ciphertexts on disk; the directory is removed when this is dropped.
#[derive(Debug)]
pub struct ChunkFile {
    file: File,
    dir: PathBuf,
    sealed: SealedFirmware,
}

impl ChunkFile {
    /// The ciphertext of chunk `index` (positioned read: many readers at once are fine).
    pub fn ciphertext(&self, index: u32) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; self.sealed.ciphertext_len(index)];
        self.file
            .read_exact_at(&mut buf, self.sealed.ciphertext_offset(index))?;
        Ok(buf)
    }
}

impl crate::runs::ChunkSource for ChunkFile {
    fn ciphertext(&self, index: u32) -> std::io::Result<Vec<u8>> {
        ChunkFile::ciphertext(self, index)
    }
}

impl Drop for ChunkFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "removing a campaign's cache directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_a_stored_image_into_chunks_that_frame_like_in_memory_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("stale"), b"x").unwrap();
        let cache = CacheDir::open(tmp.path()).unwrap();
        assert!(!tmp.path().join("stale").exists(), "emptied at start");
        // More than one batch, a short last chunk.
        let image: Vec<u8> = (0..9 * 1024 * 1024 + 777)
            .map(|i| (i % 251) as u8)
            .collect();
        let files = cache.campaign("uid-1").unwrap();
        files.write_image(&image).unwrap();
        let (sealed, chunks) = files.seal("uid-1", 65536, None).unwrap();
        assert!(
            !tmp.path().join("uid-1/image").exists(),
            "plaintext removed"
        );
        assert_eq!(sealed.size(), image.len() as u64);
        assert_eq!(sealed.sha256(), sealed_ota_protocol::crypto::sha256(&image));
        for i in [0, 1, 63, 64, sealed.chunk_count() - 1] {
            let ct = chunks.ciphertext(i).unwrap();
            assert_eq!(ct.len(), sealed.ciphertext_len(i));
            // Framed, it carries a proof that verifies against the root (what a device checks).
            let payload = sealed.chunk_payload(i, &ct).unwrap();
            let msg = sealed_ota_protocol::wire::decode_chunk(&payload).unwrap();
            assert!(sealed_ota_protocol::merkle::verify_proof(
                &sealed.merkle_root(),
                i,
                sealed.chunk_count(),
                sealed_ota_protocol::merkle::leaf_hash(i, &msg.ct),
                &msg.proof
            ));
        }
        drop(chunks);
        assert!(!tmp.path().join("uid-1").exists(), "removed with the run");
    }

    /// Two replicas seal one campaign's image with the key of the campaign's seed: the same
    /// chunks and root (a device may take chunks retained by either). Without the key (fresh) or
    /// with another image the chunks differ: the key is bound to the image's digest.
    #[test]
    fn replicas_sealing_with_the_seed_s_key_publish_the_same_chunks() {
        use sealed_ota_protocol::crypto::{seeded_content_key, sha256};
        let seal = |image: &[u8], key: Option<Zeroizing<[u8; 32]>>| {
            let tmp = tempfile::tempdir().unwrap();
            let files = CacheDir::open(tmp.path())
                .unwrap()
                .campaign("uid-1")
                .unwrap();
            files.write_image(image).unwrap();
            let (sealed, chunks) = files.seal("uid-1", 1024, key).unwrap();
            let cts: Vec<Vec<u8>> = (0..sealed.chunk_count())
                .map(|i| chunks.ciphertext(i).unwrap())
                .collect();
            (sealed.merkle_root(), cts)
        };
        let seed = [9u8; 32];
        let key = |image: &[u8]| {
            Some(seeded_content_key(
                &seed,
                "uid-1",
                "2.0.0",
                1024,
                &sha256(image),
            ))
        };
        let image: Vec<u8> = (0..5000usize).map(|i| (i % 251) as u8).collect();
        let a = seal(&image, key(&image));
        let b = seal(&image, key(&image));
        assert_eq!(a, b, "two replicas seal the same chunks");
        assert_ne!(seal(&image, None).1, a.1, "a fresh key seals other chunks");
        let mut other = image.clone();
        other[0] ^= 1;
        let c = seal(&other, key(&other));
        assert_ne!(c.1[4], a.1[4], "another image is sealed under another key");
    }

    /// A base's directory holds the delta to the image afterwards: it rebuilds the image
    /// against the base, and the size and SHA-256 returned are the delta file's.
    #[test]
    fn a_base_is_replaced_by_the_delta_to_the_image() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(tmp.path()).unwrap();
        let base: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut image = base.clone();
        image[100_000..100_500].fill(7);
        let target = cache.campaign("uid-1").unwrap();
        target.write_image(&image).unwrap();
        let files = cache.campaign("uid-1-d0").unwrap();
        files.write_image(&base).unwrap();
        let (size, sha) = files.replace_with_delta(&target.image_path()).unwrap();
        let delta = std::fs::read(files.image_path()).unwrap();
        assert_eq!(
            (size, sha),
            (
                delta.len() as u64,
                sealed_ota_protocol::crypto::sha256(&delta)
            )
        );
        assert!(delta.len() < 10_000, "{} bytes", delta.len());
        let mut rebuilt = Vec::new();
        sealed_ota_protocol::delta::apply(&base, &delta[..], &mut rebuilt, image.len() as u64)
            .unwrap();
        assert!(rebuilt == image, "the delta rebuilds the image");
    }

    #[test]
    fn an_empty_image_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(tmp.path()).unwrap();
        let files = cache.campaign("u").unwrap();
        files.write_image(&[]).unwrap();
        let err = files.seal("u", 1024, None).unwrap_err();
        assert!(err.to_string().contains("empty image"), "{err}");
    }
}
