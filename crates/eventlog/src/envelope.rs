//! The stored form of one event: a self-describing header, a crc32, and the bincode body.
//!
//! Three formats share one header and differ in what follows the crc and in the body:
//! - format 1 (legacy, read only): the bincode body as is;
//! - format 2 (legacy, read only): the bincode body compressed with LZ4 (block format,
//!   `lz4_flex`), preceded by its uncompressed length as a u32. A CommCare form is XML and its
//!   raw bytes are most of an event; LZ4 stores it in a fraction of the space, which sled 0.34.7
//!   then rewrites and caches that many fewer times (docs/PERFORMANCE.md);
//! - format 3 (written by this build): the chain hash of the previous entry (32 bytes, see
//!   [`crate::chain`]) and a body-encoding byte, then the header and a body as in format 1
//!   (encoding 0) or format 2 (encoding 1, for bodies of [`COMPRESS_FROM`] bytes or more).
//!
//! - format 4 (written by this build for a form event when the log stores raw submissions out
//!   of line, [`crate::raw`]): format 3 plus, after the body encoding, the raw submission's
//!   length (u64) and SHA-256; the body holds the form with empty raw bytes, and decoding marks
//!   them [`domain::RawBytes::Detached`]. The chain covers the bytes through that hash.
//!
//! Logs written before format 3 stay readable (I6, `tests/data/fixtures/events-v1.bin`); their
//! entries are "unchained": they carry no previous hash, but the chain still runs through their
//! bytes (docs/AUDIT.md).
//!
//! Layout (all integers little-endian); `h` is 0 for formats 1 and 2, 33 for format 3 and 73 for
//! format 4:
//!
//! | offset    | size | field                                                       |
//! |-----------|------|-------------------------------------------------------------|
//! | 0         | 1    | format version, `1`, `2` or `3`                             |
//! | 1         | 4    | crc32 (IEEE, `crc32fast`) of every byte from offset 5 on    |
//! | 5         | 32   | formats 3, 4: chain hash of the previous position (SHA-256) |
//! | 37        | 1    | formats 3, 4: body encoding, `0` plain, `1` LZ4             |
//! | 38        | 8    | format 4 only: length of the raw submission                 |
//! | 46        | 32   | format 4 only: SHA-256 of the raw submission                |
//! | 5+h       | 1    | `n`, length of the type name                                |
//! | 6+h       | n    | type name, UTF-8 ([`domain::Event::type_name`])             |
//! | 6+h+n     | 2    | type version ([`domain::Event::type_version`])              |
//! | 8+h+n     | 8    | `recorded_at`, milliseconds since the Unix epoch (i64)      |
//! | 16+h+n    | rest | plain: `bincode` 2, `config::standard()`, serde, of `RecordedEvent` |
//! | 16+h+n    | 4    | LZ4: length of the bincode body                             |
//! | 20+h+n    | rest | LZ4: that body, LZ4 block-compressed                        |
//!
//! What must hold: the header repeats what the body says (type, version, time), so an audit tool
//! or [`crate::SledLog::first_at_or_after`] can read it without decoding the body, and a decoder
//! checks that both agree. The body encodes `Event` by variant index, so the order of
//! `domain::Event`'s variants is part of this format: new variants go at the end (I6).

use domain::{CommandId, Event, Position, RecordedEvent, Timestamp};
use serde::Serialize;

use crate::chain::Hash;
use crate::raw::RawRef;
use crate::LogError;

/// The envelope format this build writes for events without a raw submission, and for form
/// events of a log that keeps raw submissions inline: chained (previous hash in the header).
pub const ENVELOPE_FORMAT: u8 = 3;

/// The envelope format of a form event whose raw submission is stored out of line
/// ([`crate::raw`]): format 3 plus the submission's length and SHA-256 after the body encoding.
pub const DETACHED_FORMAT: u8 = 4;

/// Legacy format of an uncompressed body, read from logs written before format 3.
pub const PLAIN_FORMAT: u8 = 1;

/// Legacy format of an LZ4-compressed body, read from logs written before format 3.
pub const LZ4_FORMAT: u8 = 2;

/// Bodies at least this long are compressed (body encoding 1).
pub const COMPRESS_FROM: usize = 256;

/// The largest uncompressed body a compressed envelope may claim. Forms are limited far below
/// this (`casexml::Limits`); the cap keeps a damaged length from allocating without bound.
pub const MAX_BODY: usize = 1 << 30;

/// Bytes before the crc-covered part: the format byte and the crc itself.
const CRC_END: usize = 5;

/// Format-3 body encodings.
const PLAIN_BODY: u8 = 0;
const LZ4_BODY: u8 = 1;

/// The header of an envelope, readable without decoding the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeHeader<'a> {
    /// Envelope format: [`ENVELOPE_FORMAT`], or legacy [`PLAIN_FORMAT`] / [`LZ4_FORMAT`].
    pub format: u8,
    /// The chain hash of the previous position, stored by format 3; `None` in legacy formats
    /// (an unchained entry).
    pub prev: Option<&'a Hash>,
    /// Whether the body is LZ4-compressed.
    pub compressed: bool,
    /// Format 4 only: the length and SHA-256 of the raw submission stored out of line.
    pub raw: Option<RawRef>,
    /// The event type's name, e.g. `FormAccepted`.
    pub type_name: &'a str,
    /// The event type's version.
    pub type_version: u16,
    /// When the command that produced the event was received.
    pub recorded_at: Timestamp,
    /// The body as stored: bincode, LZ4-compressed when `compressed`
    /// ([`EnvelopeHeader::bincode_body`]).
    pub body: &'a [u8],
}

impl EnvelopeHeader<'_> {
    /// The bincode body, decompressed when it is stored compressed.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] when a compressed body does not decompress to its stated length.
    pub fn bincode_body(&self) -> Result<std::borrow::Cow<'_, [u8]>, LogError> {
        if !self.compressed {
            return Ok(std::borrow::Cow::Borrowed(self.body));
        }
        let bad = |reason: String| LogError::corrupt(Position::ZERO, reason);
        let (len, compressed) = self
            .body
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("compressed body shorter than its length".into()))?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > MAX_BODY {
            return Err(bad(format!("body claims {len} bytes, over {MAX_BODY}")));
        }
        let mut out = vec![0u8; len];
        let n = lz4_flex::block::decompress_into(compressed, &mut out)
            .map_err(|e| bad(format!("body does not decompress: {e}")))?;
        if n != len {
            return Err(bad(format!(
                "body decompressed to {n} bytes, header says {len}"
            )));
        }
        Ok(std::borrow::Cow::Owned(out))
    }
}

/// Serialises exactly like [`RecordedEvent`] (same fields, same order, same types) without
/// cloning the event, so `write` can encode straight from the request.
#[derive(Serialize)]
struct RecordedRef<'a> {
    position: Position,
    recorded_at: Timestamp,
    command_id: &'a CommandId,
    event: &'a Event,
}

/// Encodes one event into `buf` (cleared first), reusing its allocation: format 3 chained to
/// `prev` when it is given (format 4 when `raw` names a detached submission: `event` must then
/// hold it [`domain::RawBytes::Detached`]), else a legacy format 1 or 2 envelope (for tests of
/// old logs).
pub(crate) fn encode_into(
    buf: &mut Vec<u8>,
    prev: Option<&Hash>,
    raw: Option<&RawRef>,
    position: Position,
    recorded_at: Timestamp,
    command_id: &CommandId,
    event: &Event,
) -> Result<(), LogError> {
    let name = event.type_name();
    let name_len = u8::try_from(name.len())
        .map_err(|_| LogError::Encode(format!("type name {name:?} is over 255 bytes")))?;
    buf.clear();
    buf.push(match (prev, raw) {
        (None, _) => PLAIN_FORMAT,
        (Some(_), None) => ENVELOPE_FORMAT,
        (Some(_), Some(_)) => DETACHED_FORMAT,
    });
    buf.extend_from_slice(&[0; 4]);
    let encoding_at = prev.map(|prev| {
        buf.extend_from_slice(prev);
        buf.push(PLAIN_BODY);
        let at = buf.len() - 1;
        if let Some(raw) = raw {
            buf.extend_from_slice(&raw.len.to_le_bytes());
            buf.extend_from_slice(&raw.hash);
        }
        at
    });
    buf.push(name_len);
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(&event.type_version().to_le_bytes());
    buf.extend_from_slice(&recorded_at.0.to_le_bytes());
    let body = RecordedRef {
        position,
        recorded_at,
        command_id,
        event,
    };
    let header_end = buf.len();
    bincode::serde::encode_into_std_write(&body, buf, bincode::config::standard())
        .map_err(|e| LogError::Encode(e.to_string()))?;
    let plain_len = buf.len() - header_end;
    if plain_len >= COMPRESS_FROM {
        let plain = buf.split_off(header_end);
        let len = u32::try_from(plain_len)
            .ok()
            .filter(|&n| n as usize <= MAX_BODY)
            .ok_or_else(|| LogError::Encode(format!("body of {plain_len} bytes is too large")))?;
        buf.extend_from_slice(&len.to_le_bytes());
        let start = buf.len();
        buf.resize(
            start + lz4_flex::block::get_maximum_output_size(plain_len),
            0,
        );
        let written = lz4_flex::block::compress_into(&plain, &mut buf[start..])
            .map_err(|e| LogError::Encode(format!("body does not compress: {e}")))?;
        buf.truncate(start + written);
        match encoding_at {
            Some(at) => buf[at] = LZ4_BODY,
            None => buf[0] = LZ4_FORMAT,
        }
    }
    let crc = crc32fast::hash(&buf[CRC_END..]);
    buf[1..CRC_END].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Encodes a recorded event as a format-3 envelope chained to `prev`, the chain hash of the
/// position before it ([`crate::GENESIS`] before position 1); see the module docs for the layout.
///
/// # Errors
/// [`LogError::Encode`] if bincode fails or the type name is over 255 bytes.
pub fn encode_envelope_chained(e: &RecordedEvent, prev: &Hash) -> Result<Vec<u8>, LogError> {
    let mut buf = Vec::new();
    encode_into(
        &mut buf,
        Some(prev),
        None,
        e.position,
        e.recorded_at,
        &e.command_id,
        &e.event,
    )?;
    Ok(buf)
}

/// The format-3 envelope of `event` at `position`, chained to `prev`, into `buf` (cleared
/// first): the bytes [`crate::SledLog`] stores for the same append with raw submissions inline,
/// without building a [`RecordedEvent`] (so without cloning the event). For other backends.
///
/// # Errors
/// [`LogError::Encode`] as [`encode_envelope_chained`].
pub fn encode_event_chained(
    buf: &mut Vec<u8>,
    prev: &Hash,
    position: Position,
    recorded_at: Timestamp,
    command_id: &CommandId,
    event: &Event,
) -> Result<(), LogError> {
    encode_into(
        buf,
        Some(prev),
        None,
        position,
        recorded_at,
        command_id,
        event,
    )
}

/// Encodes a recorded event as a format-3 envelope whose previous hash is [`crate::GENESIS`]
/// (right for position 1; for measuring and tests elsewhere).
///
/// # Errors
/// [`LogError::Encode`] if bincode fails or the type name is over 255 bytes.
pub fn encode_envelope(e: &RecordedEvent) -> Result<Vec<u8>, LogError> {
    encode_envelope_chained(e, &crate::GENESIS)
}

/// Reads and checks an envelope's header: format, crc32 over everything after it, and bounds.
///
/// # Errors
/// [`LogError::UnsupportedEnvelope`] for an unknown format byte, [`LogError::Corrupt`] for a crc
/// mismatch, an unknown body encoding or a truncated header. Positions are [`Position::ZERO`]:
/// the bytes alone do not say where they were stored.
pub fn decode_header(bytes: &[u8]) -> Result<EnvelopeHeader<'_>, LogError> {
    let bad = |reason: &str| LogError::corrupt(Position::ZERO, reason);
    let (&format, rest) = bytes.split_first().ok_or_else(|| bad("empty envelope"))?;
    if !matches!(
        format,
        PLAIN_FORMAT | LZ4_FORMAT | ENVELOPE_FORMAT | DETACHED_FORMAT
    ) {
        return Err(LogError::UnsupportedEnvelope {
            position: Position::ZERO,
            version: format,
        });
    }
    let (crc, covered) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| bad("envelope shorter than its crc"))?;
    let stored = u32::from_le_bytes(*crc);
    let actual = crc32fast::hash(covered);
    if stored != actual {
        return Err(bad(&format!(
            "crc32 mismatch: stored {stored:#010x}, computed {actual:#010x}"
        )));
    }
    let (prev, compressed, raw, rest) = if format >= ENVELOPE_FORMAT {
        let (prev, rest) = covered
            .split_first_chunk::<32>()
            .ok_or_else(|| bad("header truncated inside the previous hash"))?;
        let (&encoding, rest) = rest
            .split_first()
            .ok_or_else(|| bad("header truncated before the body encoding"))?;
        let compressed = match encoding {
            PLAIN_BODY => false,
            LZ4_BODY => true,
            other => return Err(bad(&format!("unknown body encoding {other}"))),
        };
        let (raw, rest) = if format == DETACHED_FORMAT {
            let (len, rest) = rest
                .split_first_chunk::<8>()
                .ok_or_else(|| bad("header truncated inside the raw submission's length"))?;
            let (hash, rest) = rest
                .split_first_chunk::<32>()
                .ok_or_else(|| bad("header truncated inside the raw submission's hash"))?;
            let raw = RawRef {
                len: u64::from_le_bytes(*len),
                hash: *hash,
            };
            (Some(raw), rest)
        } else {
            (None, rest)
        };
        (Some(prev), compressed, raw, rest)
    } else {
        (None, format == LZ4_FORMAT, None, covered)
    };
    let (&name_len, rest) = rest
        .split_first()
        .ok_or_else(|| bad("header truncated before the type name"))?;
    let (name, rest) = rest
        .split_at_checked(usize::from(name_len))
        .ok_or_else(|| bad("header truncated inside the type name"))?;
    let type_name = std::str::from_utf8(name).map_err(|_| bad("type name is not UTF-8"))?;
    let (version, rest) = rest
        .split_first_chunk::<2>()
        .ok_or_else(|| bad("header truncated before the type version"))?;
    let (recorded_at, body) = rest
        .split_first_chunk::<8>()
        .ok_or_else(|| bad("header truncated before recorded_at"))?;
    Ok(EnvelopeHeader {
        format,
        prev,
        compressed,
        raw,
        type_name,
        type_version: u16::from_le_bytes(*version),
        recorded_at: Timestamp(i64::from_le_bytes(*recorded_at)),
        body,
    })
}

/// Decodes and verifies an envelope: header checks of [`decode_header`], then the body, then that
/// header and body agree.
///
/// # Errors
/// As [`decode_header`], plus [`LogError::Corrupt`] when the body does not decode, has trailing
/// bytes, or disagrees with the header. Positions are [`Position::ZERO`] (not known here).
pub fn decode_envelope(bytes: &[u8]) -> Result<RecordedEvent, LogError> {
    let header = decode_header(bytes)?;
    let bad = |reason: String| LogError::corrupt(Position::ZERO, reason);
    let body = header.bincode_body()?;
    let (mut event, used): (RecordedEvent, usize) =
        bincode::serde::decode_from_slice(&body, bincode::config::standard())
            .map_err(|e| bad(format!("body does not decode: {e}")))?;
    if used != body.len() {
        return Err(bad(format!(
            "{} trailing bytes after the body",
            body.len() - used
        )));
    }
    if header.type_name != event.event.type_name()
        || header.type_version != event.event.type_version()
    {
        return Err(bad(format!(
            "header says {} v{}, body holds {} v{}",
            header.type_name,
            header.type_version,
            event.event.type_name(),
            event.event.type_version()
        )));
    }
    if header.recorded_at != event.recorded_at {
        return Err(bad(format!(
            "header recorded_at {} differs from the body's {}",
            header.recorded_at.0, event.recorded_at.0
        )));
    }
    if let Some(raw) = header.raw {
        let form = event
            .event
            .form_record_mut()
            .ok_or_else(|| bad("a detached raw submission on an event without a form".into()))?;
        if form.content_hash != raw.hash || !form.raw.is_empty() {
            return Err(bad(
                "the header's raw submission hash differs from the form's content hash".into(),
            ));
        }
        form.raw = domain::RawBytes::Detached { len: raw.len };
    }
    Ok(event)
}
