//! CaseXML v2 bytes in, [`domain::ParsedForm`] out: the reading half of CommCare's form
//! processing (SEMANTICS §1–§3, §7, §11).
//!
//! - [`parse`] reads one submission in a single streaming pass (quick-xml's `NsReader`, no tree)
//!   and returns its identity and meta (R1–R4), its case blocks in document order (R7–R31) and
//!   every [`domain::Problem`] it found, each tagged with the error code it would cause.
//! - [`XmlError`] is the other outcome: the bytes are not a readable form, which the caller
//!   stores as `InvalidXml` (R50). Every variant says where (byte offset, element path).
//! - [`Limits`] bounds the work and memory one submission may cost.
//! - [`content_hash`] is the SHA-256 the caller keeps to tell duplicates from edits (R53, R54).
//!
//! It is: strict about XML (no DTDs, no entity expansion, UTF-8 only, XML 1.0 characters only),
//! lenient about CommCare (unknown elements are ignored, children of a v2 block are matched by
//! local name whatever their prefix). It is not: a validator of project state. Whether a user,
//! case or index target exists, and which problem wins (R52), is decided by `domain::decide`.
//!
//! ```ignore
//! let form = casexml::parse(&bytes, &casexml::Limits::default())?;
//! for block in &form.blocks {
//!     println!("{} {:?}", block.case_id, block.actions.order_key());
//! }
//! if let Some(p) = form.problems.first() {
//!     println!("would be rejected: {} {}", p.code, p.message);
//! }
//! ```

mod block;
mod error;
mod refs;
mod scan;
mod tag;
mod walk;

#[cfg(test)]
mod tests;

pub use error::XmlError;

use sha2::{Digest, Sha256};

/// Bounds on what one submission may cost. Anything over a bound is an [`XmlError`], i.e. the
/// form is rejected as `InvalidXml` (R50); nothing is truncated silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest body accepted, checked before any parsing. Default 16 MiB (R50). Real forms are
    /// a few KB. The output of [`parse`] is proportional to the input, so this also bounds
    /// memory, together with `max_block_elements` (without it, a crafted form of millions of
    /// empty properties, `<n0:a/>`, turned 15 MB into a 270 MB peak).
    pub max_bytes: usize,
    /// Deepest element nesting accepted, the root being depth 1. Default 128 (R50). Also bounds
    /// the walker's stack.
    pub max_depth: usize,
    /// Most case blocks accepted in one form (`case` elements that are blocks by R7, whatever
    /// their version). Default 10 000.
    pub max_blocks: usize,
    /// Longest single text value accepted, in bytes: the character data between two tags, or
    /// one attribute value. Default 1 MiB; larger → [`XmlError::ValueTooLarge`] ("value too
    /// large"). Binary data belongs in multipart attachments, not in the XML.
    pub max_value_bytes: usize,
    /// Most elements accepted inside case blocks, over the whole form (properties, indices,
    /// attachments and the action elements themselves). Default 100 000: a real form has tens.
    /// Larger → [`XmlError::TooManyBlockElements`].
    pub max_block_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 16 * 1024 * 1024,
            max_depth: 128,
            max_blocks: 10_000,
            max_value_bytes: 1024 * 1024,
            max_block_elements: 100_000,
        }
    }
}

/// SHA-256 of the raw bytes, exactly as received (R53, R54; and R3 names forms without an
/// instanceID `sha256:<lowercase hex of this>`).
pub fn content_hash(raw: &[u8]) -> [u8; 32] {
    Sha256::digest(raw).into()
}

/// Parses one submission.
///
/// `Err` means the bytes are not a readable form (`InvalidXml`). `Ok` may still carry
/// [`domain::Problem`]s (UnsupportedCaseVersion, IllegalCaseId, PhoneDateValueError,
/// UsesReferrals, CaseValueError, InvalidCaseIndex) in document order; `domain::decide` applies
/// their precedence (R52) after the checks that need project state. Never panics; time and
/// memory are linear in the input, bounded by `limits`.
pub fn parse(raw: &[u8], limits: &Limits) -> Result<domain::ParsedForm, XmlError> {
    walk::parse(raw, limits)
}
