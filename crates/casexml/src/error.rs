//! [`XmlError`]: why a submission's bytes are not a readable form (`InvalidXml`, R50).
//!
//! Every variant is one reason the whole form is rejected as `InvalidXml` (R49). The caller never
//! retries a parse: the bytes will not change. What it should do is the same for all variants —
//! store the submission with `ErrorCode::InvalidXml` and the error's `Display` text as the
//! message (I7) — so the per-variant notes below say when the variant happens and what a person
//! reading the stored rejection can do about it.
//!
//! Offsets are byte offsets into the submitted bytes (a UTF-8 byte order mark counts). Element
//! paths are the qualified names as written, from the root down: `/data/n0:case/n0:update`.

/// Why a submission is not a readable form. All variants map to `ErrorCode::InvalidXml`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XmlError {
    /// The body is larger than `Limits::max_bytes`; nothing was parsed.
    ///
    /// Handling: store as `InvalidXml`. A real CommCare form is a few KB; a body this large is
    /// a client bug or an attack, and raising the limit is an operator decision.
    #[error("the submission is {size} bytes, over the limit of {max} bytes (R50)")]
    TooLarge {
        /// Size of the body.
        size: usize,
        /// The limit in force.
        max: usize,
    },

    /// The body is empty (zero bytes).
    ///
    /// Handling: store as `InvalidXml`; usually a client that lost the form file.
    #[error("the submission is empty")]
    Empty,

    /// The bytes are, or declare themselves to be, in an encoding other than UTF-8 / US-ASCII
    /// (UTF-16 byte order mark, `encoding="ISO-8859-1"`, …). caseledger reads UTF-8 only (R50).
    ///
    /// Handling: store as `InvalidXml`; the sender must re-encode as UTF-8.
    #[error("unsupported encoding {encoding}: only UTF-8 (or its US-ASCII subset) is accepted")]
    UnsupportedEncoding {
        /// The declared or detected encoding, as found.
        encoding: String,
    },

    /// A byte sequence that is not valid UTF-8.
    ///
    /// Handling: store as `InvalidXml`; typically a Latin-1 file without an encoding declaration.
    #[error("invalid UTF-8 at byte {offset}")]
    InvalidUtf8 {
        /// Offset of the first bad byte.
        offset: u64,
    },

    /// A character XML 1.0 forbids (NUL, other C0 controls except tab/LF/CR, U+FFFE, U+FFFF).
    ///
    /// Handling: store as `InvalidXml`; the device wrote binary junk into the form.
    #[error("character U+{code_point:04X} at byte {offset} is not allowed in XML 1.0")]
    IllegalChar {
        /// Offset of the character.
        offset: u64,
        /// The character's code point.
        code_point: u32,
    },

    /// A `<!DOCTYPE …>`. DTDs and entity declarations are refused outright: caseledger never
    /// expands entities, so "billion laughs" and external entities cannot cost anything (R50).
    ///
    /// Handling: store as `InvalidXml`; CommCare never sends a DTD.
    #[error(
        "document type declaration at byte {offset}: DTDs and entity declarations are not accepted"
    )]
    Doctype {
        /// Offset of `<!DOCTYPE`.
        offset: u64,
    },

    /// An entity reference other than the five predefined ones (`&lt;` `&gt;` `&amp;` `&apos;`
    /// `&quot;`) or a character reference.
    ///
    /// Handling: store as `InvalidXml`; usually HTML entities (`&nbsp;`) pasted into a value.
    #[error("unknown entity &{name}; at byte {offset} in {path}")]
    UnknownEntity {
        /// Offset near the reference.
        offset: u64,
        /// Element path.
        path: String,
        /// The entity name, without `&` and `;`.
        name: String,
    },

    /// A character reference that is malformed or names a character XML 1.0 forbids (`&#0;`).
    ///
    /// Handling: store as `InvalidXml`.
    #[error("character reference &{reference}; at byte {offset} in {path} is not a legal XML 1.0 character")]
    IllegalCharRef {
        /// Offset near the reference.
        offset: u64,
        /// Element path.
        path: String,
        /// The reference without `&` and `;`, e.g. `#0` or `#x1F`.
        reference: String,
    },

    /// The same attribute twice on one element.
    ///
    /// Handling: store as `InvalidXml`.
    #[error("duplicate attribute {name:?} at byte {offset} on {path}")]
    DuplicateAttribute {
        /// Offset of the element.
        offset: u64,
        /// Path of the element carrying the attribute.
        path: String,
        /// The attribute's qualified name.
        name: String,
    },

    /// An element or attribute prefix with no `xmlns:prefix` declaration in scope.
    ///
    /// Handling: store as `InvalidXml`; the form was assembled by hand or truncated oddly.
    #[error("undeclared namespace prefix {prefix:?} at byte {offset} on {path}")]
    UndeclaredPrefix {
        /// Offset of the element.
        offset: u64,
        /// Path of the element.
        path: String,
        /// The prefix.
        prefix: String,
    },

    /// More namespace declarations in scope at once than the parser keeps (a fixed bound that
    /// keeps prefix lookup cheap; real forms declare fewer than ten).
    ///
    /// Handling: store as `InvalidXml`; only a crafted document gets here.
    #[error("more than {max} namespace declarations in scope at byte {offset} on {path}")]
    TooManyNamespaces {
        /// Offset of the element.
        offset: u64,
        /// Path of the element.
        path: String,
        /// The bound.
        max: usize,
    },

    /// Elements nested deeper than `Limits::max_depth` (R50: 128).
    ///
    /// Handling: store as `InvalidXml`.
    #[error("element nesting deeper than {max} at byte {offset} in {path}")]
    TooDeep {
        /// Offset of the element that went too deep.
        offset: u64,
        /// Path down to it (long).
        path: String,
        /// The limit.
        max: usize,
    },

    /// More case blocks than `Limits::max_blocks`.
    ///
    /// Handling: store as `InvalidXml`; split the work over several forms.
    #[error("more than {max} case blocks (block at byte {offset})")]
    TooManyBlocks {
        /// Offset of the first block over the limit.
        offset: u64,
        /// The limit.
        max: usize,
    },

    /// More elements inside case blocks than `Limits::max_block_elements`.
    ///
    /// Handling: store as `InvalidXml`; no real form comes near the limit.
    #[error("more than {max} elements inside case blocks (at byte {offset})")]
    TooManyBlockElements {
        /// Offset of the first element over the limit.
        offset: u64,
        /// The limit.
        max: usize,
    },

    /// One text value (an element's character data, or an attribute value) longer than
    /// `Limits::max_value_bytes`.
    ///
    /// Handling: store as `InvalidXml`; binary data belongs in a multipart attachment.
    #[error("value too large: over {max} bytes at byte {offset} in {path}")]
    ValueTooLarge {
        /// Offset where the limit was crossed.
        offset: u64,
        /// Element path.
        path: String,
        /// The limit.
        max: usize,
    },

    /// No root element (only whitespace, comments or processing instructions).
    ///
    /// Handling: store as `InvalidXml`.
    #[error("no root element")]
    NoRoot,

    /// Text, CDATA, a reference or a second element outside the single root element
    /// ("garbage after root").
    ///
    /// Handling: store as `InvalidXml`; often two forms concatenated into one body.
    #[error("{found} outside the root element at byte {offset}")]
    ContentOutsideRoot {
        /// Offset of the content.
        offset: u64,
        /// What was found.
        found: &'static str,
    },

    /// An end tag that does not match the open element.
    ///
    /// Handling: store as `InvalidXml`; the form was corrupted on the device.
    #[error(
        "mismatched end tag at byte {offset} in {path}: expected </{expected}>, found </{found}>"
    )]
    MismatchedEndTag {
        /// Offset of the end tag.
        offset: u64,
        /// Path of the open element.
        path: String,
        /// Name of the open element.
        expected: String,
        /// Name in the end tag.
        found: String,
    },

    /// The input ended while elements were still open (a truncated upload).
    ///
    /// Handling: store as `InvalidXml`; the phone should resend the whole form.
    #[error("input ended inside {path}: the submission is truncated")]
    Truncated {
        /// The innermost open element.
        path: String,
    },

    /// Any other well-formedness error (bad markup, unterminated tag or comment, `<` in an
    /// attribute value, misplaced XML declaration, …), with the underlying parser's words.
    ///
    /// Handling: store as `InvalidXml`.
    #[error("not well-formed at byte {offset} in {path}: {detail}")]
    Malformed {
        /// Offset of the error.
        offset: u64,
        /// Element path (`/` before the root).
        path: String,
        /// What is wrong.
        detail: String,
    },
}
