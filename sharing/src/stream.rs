//! Streaming split/combine of whole secrets into share files (see [`crate::format`]), and
//! [`ChunkedSplit`], the chunk reader (read, hash, split) under [`split_stream`] and the
//! backup client's store pipeline.
//!
//! Memory use is bounded by `(n + 1)·chunk_size` when splitting and `(k + 2)·chunk_size`
//! when combining, whatever the secret's size.

use std::io::{self, Read, Write};

use zeroize::Zeroizing;

use crate::format::{ShareHeader, ShareTrailer, HEADER_LEN, MIN_STREAM_CHUNK_SIZE, TRAILER_LEN};
use crate::rng::{RandomSource, RngError};
use crate::sharing::{Combiner, Scheme, SharingError, Splitter};

/// Result of a successful split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitSummary {
    /// Random set ID written into every share (a UUID v4).
    pub set_id: uuid::Uuid,
    /// Secret length in bytes.
    pub original_len: u64,
    /// Chunks per share.
    pub chunk_count: u64,
    /// BLAKE3-256 of the secret.
    pub digest: [u8; 32],
}

/// Result of a successful combine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CombineSummary {
    /// Set ID of the shares.
    pub set_id: uuid::Uuid,
    /// Scheme of the shares.
    pub scheme: Scheme,
    /// Share indices used (the first `k` given).
    pub indices_used: Vec<u8>,
    /// Bytes written.
    pub original_len: u64,
    /// Verified BLAKE3-256 of the output.
    pub digest: [u8; 32],
}

/// Reads until `buf` is full or end of input; returns the bytes read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A fresh random set ID from the OS generator (uniqueness matters here, not secrecy).
fn new_set_id() -> Result<uuid::Uuid, RngError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(RngError::Os)?;
    Ok(uuid::Builder::from_random_bytes(b).into_uuid())
}

/// Length, chunk count and digest of everything a [`ChunkedSplit`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitDigest {
    /// Secret length in bytes.
    pub original_len: u64,
    /// Chunks read (the last one possibly short).
    pub chunk_count: u64,
    /// BLAKE3-256 of the secret.
    pub digest: [u8; 32],
}

/// Reads a secret chunk by chunk, hashes it with BLAKE3 and splits the chunks asked for.
///
/// This is the one read + hash + split path: [`split_stream`] (and so [`split`], the tests
/// and the benches) and the backup client's store pipeline both run it. Each
/// [`next_chunk`](Self::next_chunk) reads up to `chunk_size` bytes into one reused buffer
/// (the final partial chunk zero-padded), adds them to the running digest and returns a
/// [`SecretChunk`]. The caller splits it into share buffers it owns — reused, as
/// [`split_stream`] does, or fresh ones handed on to other threads — or drops it unsplit
/// (a chunk stored by an earlier run must still be read and hashed, but not dealt again).
///
/// Memory: one `chunk_size` secret buffer (wiped on drop) plus the splitter's pad.
pub struct ChunkedSplit<R: RandomSource, I: Read> {
    splitter: Splitter<R>,
    input: I,
    secret: Zeroizing<Vec<u8>>,
    hasher: blake3::Hasher,
    original_len: u64,
    chunk_count: u64,
    /// End of input seen (empty read, or a short chunk).
    finished: bool,
}

impl<R: RandomSource, I: Read> std::fmt::Debug for ChunkedSplit<R, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkedSplit")
            .field("splitter", &self.splitter)
            .field("original_len", &self.original_len)
            .field("chunk_count", &self.chunk_count)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// One secret chunk read by a [`ChunkedSplit`], ready to be split (or skipped by dropping).
pub struct SecretChunk<'a, R: RandomSource> {
    /// Chunk index, from 0.
    pub index: u64,
    /// Bytes of secret in this chunk (`chunk_size` except for the last chunk).
    pub len: usize,
    secret: &'a [u8],
    splitter: &'a mut Splitter<R>,
}

impl<R: RandomSource> std::fmt::Debug for SecretChunk<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretChunk")
            .field("index", &self.index)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<R: RandomSource> SecretChunk<'_, R> {
    /// Splits this chunk into `shares` (`n` buffers of `chunk_size` bytes; share `i` goes
    /// to `shares[i]`), with fresh randomness.
    ///
    /// # Errors
    /// As [`Splitter::split_chunk`].
    pub fn split_into<S: AsMut<[u8]>>(self, shares: &mut [S]) -> Result<(), SharingError> {
        self.splitter.split_chunk(self.secret, shares)
    }
}

impl<R: RandomSource, I: Read> ChunkedSplit<R, I> {
    /// Reads `input` in chunks of `chunk_size` bytes, split with `scheme` and `rng`.
    ///
    /// # Errors
    /// [`SharingError::Scheme`] if the chunk size is invalid for the scheme.
    pub fn new(scheme: Scheme, chunk_size: usize, rng: R, input: I) -> Result<Self, SharingError> {
        let splitter = Splitter::new(scheme, chunk_size, rng)?;
        Ok(Self {
            splitter,
            input,
            secret: Zeroizing::new(vec![0u8; chunk_size]),
            hasher: blake3::Hasher::new(),
            original_len: 0,
            chunk_count: 0,
            finished: false,
        })
    }

    /// The scheme.
    #[must_use]
    pub fn scheme(&self) -> Scheme {
        self.splitter.scheme()
    }

    /// Bytes per chunk.
    #[must_use]
    pub fn chunk_size(&self) -> usize {
        self.splitter.chunk_size()
    }

    /// Reads and hashes the next chunk; `None` at the end of the input. After a short
    /// chunk the input is not read again.
    ///
    /// # Errors
    /// [`SharingError::Io`] if reading fails.
    pub fn next_chunk(&mut self) -> Result<Option<SecretChunk<'_, R>>, SharingError> {
        if self.finished {
            return Ok(None);
        }
        let got = read_full(&mut self.input, &mut self.secret)?;
        if got == 0 {
            self.finished = true;
            return Ok(None);
        }
        self.hasher.update(&self.secret[..got]);
        if got < self.secret.len() {
            self.secret[got..].fill(0);
            self.finished = true;
        }
        let index = self.chunk_count;
        self.chunk_count += 1;
        self.original_len += got as u64;
        Ok(Some(SecretChunk {
            index,
            len: got,
            secret: &self.secret,
            splitter: &mut self.splitter,
        }))
    }

    /// Length, chunk count and digest of what was read.
    #[must_use]
    pub fn finish(self) -> SplitDigest {
        SplitDigest {
            original_len: self.original_len,
            chunk_count: self.chunk_count,
            digest: *self.hasher.finalize().as_bytes(),
        }
    }
}

/// Splits everything `input` yields into `outputs.len() == n` share files.
///
/// Each output receives the header, then one share chunk per `chunk_size` bytes of input
/// (the final partial chunk zero-padded), then the trailer with length and digest. Outputs
/// are flushed at the end. On error the outputs hold partial data and must be discarded.
/// Reading, hashing and splitting are [`ChunkedSplit`]'s; the `n` share buffers are reused
/// for every chunk.
///
/// # Errors
/// Invalid chunk size ([`SharingError::Scheme`] / [`SharingError::Format`]), wrong output
/// count ([`SharingError::ShareCount`]), randomness or I/O failures.
pub fn split_stream<R: RandomSource, I: Read, W: Write>(
    scheme: Scheme,
    chunk_size: usize,
    rng: R,
    input: I,
    outputs: &mut [W],
) -> Result<SplitSummary, SharingError> {
    let mut chunks = ChunkedSplit::new(scheme, chunk_size, rng, input)?;
    let n = usize::from(scheme.n());
    if outputs.len() != n {
        return Err(SharingError::ShareCount {
            expected: n,
            got: outputs.len(),
        });
    }
    let set_id = new_set_id()?;
    let headers = write_headers(scheme, chunk_size, set_id, outputs)?;
    let mut shares: Vec<Zeroizing<Vec<u8>>> = (0..n)
        .map(|_| Zeroizing::new(vec![0u8; chunk_size]))
        .collect();
    while let Some(chunk) = chunks.next_chunk()? {
        chunk.split_into(&mut shares)?;
        for (out, share) in outputs.iter_mut().zip(&shares) {
            out.write_all(share)?;
        }
    }
    let SplitDigest {
        original_len,
        chunk_count,
        digest,
    } = chunks.finish();
    let trailer = ShareTrailer {
        original_len,
        chunk_count,
        digest,
    };
    for (out, header) in outputs.iter_mut().zip(&headers) {
        out.write_all(&trailer.encode(header))?;
        out.flush()?;
    }
    Ok(SplitSummary {
        set_id,
        original_len,
        chunk_count,
        digest,
    })
}

/// Writes share `i`'s header to `outputs[i]`; returns the encoded headers.
fn write_headers<W: Write>(
    scheme: Scheme,
    chunk_size: usize,
    set_id: uuid::Uuid,
    outputs: &mut [W],
) -> Result<Vec<[u8; HEADER_LEN]>, SharingError> {
    let mut headers = Vec::with_capacity(outputs.len());
    for (i, out) in outputs.iter_mut().enumerate() {
        let header = ShareHeader {
            scheme,
            index: i as u8,
            chunk_size,
            set_id: *set_id.as_bytes(),
        }
        .encode()
        .map_err(|source| SharingError::Format { pos: i, source })?;
        out.write_all(&header)?;
        headers.push(header);
    }
    Ok(headers)
}

/// Reads and validates the header of one share file.
///
/// # Errors
/// [`SharingError::Truncated`] if shorter than a header, [`SharingError::Format`] if the
/// header is invalid (`pos` is 0).
pub fn read_header<I: Read>(mut input: I) -> Result<ShareHeader, SharingError> {
    read_header_at(&mut input, 0).map(|(h, _)| h)
}

fn read_header_at<I: Read + ?Sized>(
    input: &mut I,
    pos: usize,
) -> Result<(ShareHeader, [u8; HEADER_LEN]), SharingError> {
    let mut b = [0u8; HEADER_LEN];
    if read_full(input, &mut b)? != HEADER_LEN {
        return Err(SharingError::Truncated { pos });
    }
    let h = ShareHeader::decode(&b).map_err(|source| SharingError::Format { pos, source })?;
    Ok((h, b))
}

/// What one read step found in a share.
enum Unit {
    Chunk,
    Trailer,
}

/// Reconstructs the secret from share files and writes it to `output`.
///
/// All given shares' headers are checked (same set ID, scheme and chunk size, distinct
/// indices, at least `k` of them); the first `k` are then used. The digest is verified at
/// the end: on [`SharingError::DigestMismatch`] (or any error) the bytes already written to
/// `output` are not the secret and must be discarded (write to a temporary file and rename
/// on success).
///
/// # Errors
/// See [`SharingError`]: set/parameter mismatches, too few shares, truncation, damaged
/// headers/trailers, digest mismatch, I/O.
pub fn combine_stream<I: Read, W: Write>(
    inputs: &mut [I],
    mut output: W,
) -> Result<CombineSummary, SharingError> {
    let headers = read_headers(inputs)?;
    let first = headers[0].0;
    let k = usize::from(first.scheme.k());
    let cs = first.chunk_size;
    debug_assert!(cs >= MIN_STREAM_CHUNK_SIZE);
    let indices: Vec<u8> = headers[..k].iter().map(|(h, _)| h.index).collect();
    let combiner = Combiner::new(first.scheme, cs, &indices)?;
    let inputs = &mut inputs[..k];

    let mut shares: Vec<Zeroizing<Vec<u8>>> =
        (0..k).map(|_| Zeroizing::new(vec![0u8; cs])).collect();
    // `held` is the last rebuilt chunk, written only once we know whether it is the last
    // one (which must be cut to the true length).
    let mut held = Zeroizing::new(vec![0u8; cs]);
    let mut have_held = false;
    let mut hasher = blake3::Hasher::new();
    let mut chunks: u64 = 0;
    let mut written: u64 = 0;
    while let Some(Unit::Chunk) = read_unit(inputs, &mut shares, cs)? {
        if have_held {
            hasher.update(&held);
            output.write_all(&held)?;
            written += cs as u64;
        }
        combiner.combine_chunk(&shares, &mut held)?;
        have_held = true;
        chunks += 1;
    }
    let trailer = read_trailers(inputs, &shares, &headers[..k])?;
    if trailer.chunk_count != chunks {
        return Err(SharingError::ChunkCountMismatch {
            expected: trailer.chunk_count,
            got: chunks,
        });
    }
    if have_held {
        // Trailer decoding guaranteed 0 < len − written <= cs.
        let tail = usize::try_from(trailer.original_len - written)
            .unwrap_or(cs)
            .min(cs);
        hasher.update(&held[..tail]);
        output.write_all(&held[..tail])?;
        written += tail as u64;
    }
    output.flush()?;
    let digest = *hasher.finalize().as_bytes();
    // Not secret-dependent timing in a way that matters: the digest is public in the trailer.
    if digest != trailer.digest {
        return Err(SharingError::DigestMismatch);
    }
    Ok(CombineSummary {
        set_id: uuid::Uuid::from_bytes(first.set_id),
        scheme: first.scheme,
        indices_used: indices,
        original_len: written,
        digest,
    })
}

/// Reads every input's header; they must be of one set, with one scheme and chunk size,
/// distinct indices, and at least k of them.
fn read_headers<I: Read>(
    inputs: &mut [I],
) -> Result<Vec<(ShareHeader, [u8; HEADER_LEN])>, SharingError> {
    if inputs.is_empty() {
        return Err(SharingError::NoShares);
    }
    let mut headers = Vec::with_capacity(inputs.len());
    for (pos, input) in inputs.iter_mut().enumerate() {
        headers.push(read_header_at(input, pos)?);
    }
    let first = headers[0].0;
    for (pos, (h, _)) in headers.iter().enumerate().skip(1) {
        if h.set_id != first.set_id {
            return Err(SharingError::MixedSets { pos });
        }
        if h.scheme != first.scheme || h.chunk_size != first.chunk_size {
            return Err(SharingError::MismatchedParams { pos });
        }
        if headers[..pos].iter().any(|(o, _)| o.index == h.index) {
            return Err(SharingError::DuplicateIndex { index: h.index });
        }
    }
    let k = usize::from(first.scheme.k());
    if inputs.len() < k {
        return Err(SharingError::NotEnoughShares {
            have: inputs.len(),
            need: k,
        });
    }
    Ok(headers)
}

/// Reads the next unit of every share into `shares`: all a chunk of `cs` bytes, or all a
/// trailer; anything else is a truncated share. `None` when there are no inputs.
fn read_unit<I: Read>(
    inputs: &mut [I],
    shares: &mut [Zeroizing<Vec<u8>>],
    cs: usize,
) -> Result<Option<Unit>, SharingError> {
    let mut unit = None;
    for (pos, (input, buf)) in inputs.iter_mut().zip(shares.iter_mut()).enumerate() {
        let got = read_full(input, buf)?;
        let this = match got {
            g if g == cs => Unit::Chunk,
            TRAILER_LEN => Unit::Trailer,
            _ => return Err(SharingError::Truncated { pos }),
        };
        match (&unit, &this) {
            (None, _) | (Some(Unit::Chunk), Unit::Chunk) | (Some(Unit::Trailer), Unit::Trailer) => {
            }
            _ => return Err(SharingError::Truncated { pos }),
        }
        unit = Some(this);
    }
    Ok(unit)
}

/// The trailers (read into `shares` by the last [`read_unit`]): each checked against its
/// own header, nothing after it, then all compared.
fn read_trailers<I: Read>(
    inputs: &mut [I],
    shares: &[Zeroizing<Vec<u8>>],
    headers: &[(ShareHeader, [u8; HEADER_LEN])],
) -> Result<ShareTrailer, SharingError> {
    let mut trailer: Option<ShareTrailer> = None;
    for (pos, ((input, buf), (h, hb))) in inputs.iter_mut().zip(shares).zip(headers).enumerate() {
        let mut tb = [0u8; TRAILER_LEN];
        tb.copy_from_slice(&buf[..TRAILER_LEN]);
        let t = ShareTrailer::decode(&tb, hb, h.chunk_size)
            .map_err(|source| SharingError::Format { pos, source })?;
        let mut extra = [0u8; 1];
        if read_full(input, &mut extra)? != 0 {
            return Err(SharingError::TrailingData { pos });
        }
        match &trailer {
            None => trailer = Some(t),
            Some(first_t) if *first_t != t => return Err(SharingError::TrailerMismatch { pos }),
            Some(_) => {}
        }
    }
    trailer.ok_or(SharingError::NoShares)
}

/// Splits an in-memory secret into `n` complete share files (header, payload, trailer).
///
/// # Errors
/// As [`split_stream`].
pub fn split<R: RandomSource>(
    scheme: Scheme,
    chunk_size: usize,
    rng: R,
    secret: &[u8],
) -> Result<Vec<Vec<u8>>, SharingError> {
    let mut outs: Vec<Vec<u8>> = vec![Vec::new(); usize::from(scheme.n())];
    split_stream(scheme, chunk_size, rng, secret, &mut outs)?;
    Ok(outs)
}

/// Reconstructs an in-memory secret from complete share files.
///
/// # Errors
/// As [`combine_stream`].
pub fn combine<S: AsRef<[u8]>>(shares: &[S]) -> Result<Vec<u8>, SharingError> {
    let mut readers: Vec<&[u8]> = shares.iter().map(AsRef::as_ref).collect();
    let mut out = Vec::new();
    combine_stream(&mut readers, &mut out)?;
    Ok(out)
}
