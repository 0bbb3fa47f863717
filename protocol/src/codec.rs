//! CBOR encoding helpers (ciborium) with bounded, non-panicking decoding, serde adapters that
//! encode byte fields as CBOR byte strings (not arrays of integers), and the few raw CBOR heads the
//! chunk encoder writes itself so that ciphertexts are encrypted in place inside their message.

use crate::prelude::*;

use serde::de::DeserializeOwned;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::error::ProtocolError;

/// Maximum nesting depth accepted by every decoder.
pub const MAX_DEPTH: usize = 16;

/// Encode as CBOR.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_with_capacity(value, 256)
}

/// Encode as CBOR into a buffer pre-sized for `capacity` bytes (avoids regrowing large payloads).
pub(crate) fn encode_with_capacity<T: Serialize>(value: &T, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    // Writing into a Vec cannot fail for our types (no maps with non-string keys, no I/O).
    if ciborium::ser::into_writer(value, &mut out).is_err() {
        out.clear();
    }
    out
}

/// Counts what ciborium would write (into the `usize` it borrows: ciborium takes its writer by
/// value, and a `&mut` writer is a `ciborium_io::Write` only in `no_std` builds).
struct Counter<'a>(&'a mut usize);

impl ciborium_io::Write for Counter<'_> {
    type Error = core::convert::Infallible;
    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        *self.0 += buf.len();
        Ok(())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Encode a value that holds a secret (a delivered private key): a first pass counts the bytes, the
/// second writes them into a buffer of exactly that capacity, so no reallocation leaves a copy of
/// the secret in freed memory; the buffer is zeroized on drop.
pub(crate) fn encode_secret<T: Serialize>(value: &T) -> Zeroizing<Vec<u8>> {
    let mut size = 0;
    if ciborium::ser::into_writer(value, Counter(&mut size)).is_err() {
        size = 0;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(size));
    if ciborium::ser::into_writer(value, &mut *out).is_err() || out.len() != size {
        out.clear();
    }
    out
}

#[cfg(feature = "manager")]
/// CBOR major type: unsigned integer.
pub(crate) const MAJOR_UINT: u8 = 0;
#[cfg(feature = "manager")]
/// CBOR major type: byte string.
pub(crate) const MAJOR_BYTES: u8 = 2;
#[cfg(feature = "manager")]
/// CBOR major type: text string.
pub(crate) const MAJOR_TEXT: u8 = 3;
#[cfg(feature = "manager")]
/// CBOR major type: array.
pub(crate) const MAJOR_ARRAY: u8 = 4;
#[cfg(feature = "manager")]
/// CBOR major type: map.
pub(crate) const MAJOR_MAP: u8 = 5;

#[cfg(feature = "manager")]
/// Append a CBOR head (RFC 8949 §3) in its shortest form, as ciborium writes it: an unsigned
/// integer's value, or the length of a string, array or map.
pub(crate) fn write_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if let Ok(b) = u8::try_from(n) {
        out.extend_from_slice(&[m | 24, b]);
    } else if let Ok(h) = u16::try_from(n) {
        out.push(m | 25);
        out.extend_from_slice(&h.to_be_bytes());
    } else if let Ok(w) = u32::try_from(n) {
        out.push(m | 26);
        out.extend_from_slice(&w.to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

#[cfg(feature = "manager")]
/// Append a CBOR text string.
pub(crate) fn write_text(out: &mut Vec<u8>, text: &str) {
    write_head(out, MAJOR_TEXT, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

/// Decode CBOR of at most `max` bytes, with bounded recursion and no trailing bytes.
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    message: &'static str,
    max: usize,
) -> Result<T, ProtocolError> {
    bounded_whole(bytes, message, max, |reader| {
        ciborium::de::from_reader_with_recursion_limit(reader, MAX_DEPTH)
    })
}

/// Run `parse` on `bytes` (at most `max` of them), which must consume all of them.
fn bounded_whole<T, E: core::fmt::Debug>(
    bytes: &[u8],
    message: &'static str,
    max: usize,
    parse: impl FnOnce(&mut &[u8]) -> Result<T, E>,
) -> Result<T, ProtocolError> {
    if bytes.len() > max {
        return Err(ProtocolError::TooLarge {
            message,
            size: bytes.len(),
            max,
        });
    }
    let mut reader = bytes;
    let value = parse(&mut reader).map_err(|e| ProtocolError::Decode {
        message,
        detail: short(&e),
    })?;
    if !reader.is_empty() {
        return Err(ProtocolError::Decode {
            message,
            detail: "trailing bytes".into(),
        });
    }
    Ok(value)
}

/// Decode CBOR that holds a secret (a delivered private key). Like [`decode`], but byte strings
/// pass through a heap scratch buffer that is zeroized afterwards (ciborium's own decoder leaves
/// them in a stack array). ciborium then bounds nesting at its default of 256 instead of
/// [`MAX_DEPTH`]; only authenticated plaintext (the decrypted update body) is decoded this way.
pub(crate) fn decode_secret<T: DeserializeOwned>(
    bytes: &[u8],
    message: &'static str,
    max: usize,
) -> Result<T, ProtocolError> {
    let mut scratch = Zeroizing::new(vec![0u8; 4096]);
    bounded_whole(bytes, message, max, |reader| {
        ciborium::de::from_reader_with_buffer(reader, &mut scratch[..])
    })
}

fn short<E: core::fmt::Debug>(e: &E) -> String {
    let s = format!("{e:?}");
    s.chars().take(120).collect()
}

/// serde adapter: `Vec<u8>` as a CBOR byte string.
pub(crate) mod bytes {
    use crate::prelude::*;
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    pub(crate) struct BytesVisitor;

    impl<'de> de::Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            // JSON (persisted DeviceState) carries bytes as hex strings.
            hex::decode(v).map_err(E::custom)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                if out.len() >= 1 << 24 {
                    return Err(de::Error::custom("byte sequence too long"));
                }
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// serde adapter: `Option<Vec<u8>>` as an optional CBOR byte string.
pub(crate) mod opt_bytes {
    use crate::prelude::*;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&serde_bytes_ref(b)),
            None => s.serialize_none(),
        }
    }

    struct Wrap(Vec<u8>);
    impl<'de> Deserialize<'de> for Wrap {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::bytes::deserialize(d).map(Wrap)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }

    struct Ref<'a>(&'a [u8]);
    impl serde::Serialize for Ref<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }
    fn serde_bytes_ref(b: &[u8]) -> Ref<'_> {
        Ref(b)
    }
}

/// serde adapter: `[u8; N]` as a CBOR byte string of exactly N bytes.
pub(crate) mod array {
    use crate::prelude::*;
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let v = d.deserialize_byte_buf(super::bytes::BytesVisitor)?;
        v.try_into()
            .map_err(|v: Vec<u8>| de::Error::invalid_length(v.len(), &"a fixed-size byte string"))
    }
}

/// serde adapter: `Option<[u8; N]>` as an optional CBOR byte string of exactly N bytes.
pub(crate) mod opt_array {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct A<const N: usize>(#[serde(with = "super::array")] [u8; N]);

    pub fn serialize<S: Serializer, const N: usize>(
        v: &Option<[u8; N]>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.map(A).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<Option<[u8; N]>, D::Error> {
        Ok(Option::<A<N>>::deserialize(d)?.map(|a| a.0))
    }
}

/// serde adapter: `Vec<[u8; 32]>` as an array of 32-byte strings.
pub(crate) mod hashes {
    use crate::prelude::*;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct H(#[serde(with = "super::array")] [u8; 32]);

    pub fn serialize<S: Serializer>(v: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        let w: Vec<H> = v.iter().map(|h| H(*h)).collect();
        w.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        Ok(Vec::<H>::deserialize(d)?.into_iter().map(|h| h.0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Secretish {
        #[serde(with = "bytes")]
        cert: Vec<u8>,
        #[serde(with = "bytes")]
        key: Vec<u8>,
    }

    /// A buffer that held a delivered key is never regrown (a regrown Vec frees its old copy
    /// without zeroizing it): the secret encoding is sized exactly, and equals the plain encoding.
    #[test]
    fn secrets_are_encoded_into_an_exact_buffer_and_decode_back() {
        for (cert, key) in [(10usize, 5usize), (600, 138), (3000, 138), (0, 0)] {
            let v = Secretish {
                cert: vec![1; cert],
                key: vec![2; key],
            };
            let out = encode_secret(&v);
            assert_eq!(out.capacity(), out.len(), "{cert}/{key}");
            assert_eq!(&out[..], &encode(&v)[..]);
            let back: Secretish = decode_secret(&out, "t", 1 << 20).unwrap();
            assert_eq!(back, v);
        }
        let mut t = encode(&Secretish {
            cert: vec![],
            key: vec![1],
        });
        t.push(0);
        assert!(decode_secret::<Secretish>(&t, "t", 1 << 20).is_err());
        assert!(matches!(
            decode_secret::<Secretish>(&[0u8; 10], "t", 5),
            Err(ProtocolError::TooLarge { .. })
        ));
    }
}
