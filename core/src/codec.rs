//! A tiny checked binary reader/writer: big-endian integers and length-prefixed byte
//! strings. The reader returns [`CodecError`] on truncated or oversized input and never
//! panics.
//!
//! ```
//! use idemgate_core::codec::{Reader, Writer};
//! let mut w = Writer::default();
//! w.u16(7);
//! w.bytes32(b"abc");
//! let buf = w.finish();
//! let mut r = Reader::new(&buf);
//! assert_eq!(r.u16().unwrap(), 7);
//! assert_eq!(r.bytes32().unwrap(), b"abc");
//! r.end().unwrap();
//! ```
use std::fmt;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// The input ended early.
    Truncated,
    /// Bytes were left after the value.
    TrailingBytes(usize),
    /// The magic bytes or version are not ours.
    BadHeader,
    /// A tag or field has a value this version does not know.
    BadValue(&'static str),
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecError::Truncated => write!(f, "truncated record"),
            CodecError::TrailingBytes(n) => write!(f, "{n} trailing bytes after record"),
            CodecError::BadHeader => write!(f, "not an idemgate record (bad magic or version)"),
            CodecError::BadValue(what) => write!(f, "invalid {what} in record"),
        }
    }
}

impl std::error::Error for CodecError {}

/// Appends values to a buffer.
#[derive(Default, Debug)]
pub struct Writer(Vec<u8>);

impl Writer {
    /// A writer with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    /// Appends one byte.
    #[inline(always)]
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    /// Appends a big-endian u16.
    #[inline(always)]
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    /// Appends a big-endian u32.
    #[inline(always)]
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    /// Appends a big-endian u64.
    #[inline(always)]
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    /// Appends raw bytes (fixed length known to the reader).
    #[inline(always)]
    pub fn raw(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    /// Appends bytes prefixed by a u16 length (truncated at u16::MAX).
    #[inline(always)]
    pub fn bytes16(&mut self, v: &[u8]) {
        let len = v.len().min(usize::from(u16::MAX));
        self.u16(u16::try_from(len).unwrap_or(u16::MAX));
        self.0.extend_from_slice(v.get(..len).unwrap_or_default());
    }
    /// Appends bytes prefixed by a u32 length (truncated at u32::MAX).
    #[inline(always)]
    pub fn bytes32(&mut self, v: &[u8]) {
        let len = v.len().min(u32::MAX as usize);
        self.u32(u32::try_from(len).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v.get(..len).unwrap_or_default());
    }
    /// The bytes written.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads values back, checking every length.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if n > self.buf.len() {
            return Err(CodecError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    #[inline(always)]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    /// Reads one byte.
    #[inline(always)]
    pub fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(u8::from_be_bytes(self.array::<1>()?))
    }
    /// Reads a big-endian u16.
    #[inline(always)]
    pub fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array::<2>()?))
    }
    /// Reads a big-endian u32.
    #[inline(always)]
    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array::<4>()?))
    }
    /// Reads a big-endian u64.
    #[inline(always)]
    pub fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array::<8>()?))
    }
    /// Reads `N` raw bytes.
    #[inline(always)]
    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        self.array::<N>()
    }
    /// Reads u16-length-prefixed bytes.
    #[inline(always)]
    pub fn bytes16(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    /// Reads u32-length-prefixed bytes.
    #[inline(always)]
    pub fn bytes32(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()?;
        self.take(usize::try_from(n).map_err(|_| CodecError::Truncated)?)
    }
    /// Succeeds only when every byte was consumed.
    pub fn end(&self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::TrailingBytes(self.buf.len()))
        }
    }
}
