//! The byte-level gate every submission passes before the XML reader sees it (R50).
//!
//! One linear pass decides the encoding questions the streaming reader cannot: UTF-16/UTF-32
//! byte order marks and `<?xml … encoding="…"?>` declarations other than UTF-8/ASCII are refused
//! with a message that says so; the rest must be valid UTF-8 containing only characters XML 1.0
//! allows. After this gate the reader can work on `&str` without further checks, and every
//! offset it reports can be shifted by the stripped byte order mark to point into the raw bytes.

use crate::XmlError;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Checks the raw bytes and returns them as text, without a UTF-8 byte order mark, together with
/// the number of bytes stripped.
pub(crate) fn check(raw: &[u8]) -> Result<(&str, usize), XmlError> {
    if raw.is_empty() {
        return Err(XmlError::Empty);
    }
    if let Some(encoding) = foreign_encoding(raw) {
        return Err(XmlError::UnsupportedEncoding {
            encoding: encoding.to_owned(),
        });
    }
    let (body, skipped) = match raw.strip_prefix(UTF8_BOM) {
        Some(rest) => (rest, UTF8_BOM.len()),
        None => (raw, 0),
    };
    if let Some(encoding) = declared_encoding(body) {
        if !is_utf8_name(encoding) {
            return Err(XmlError::UnsupportedEncoding {
                encoding: format!("{:?} (declared)", String::from_utf8_lossy(encoding)),
            });
        }
    }
    let text = std::str::from_utf8(body).map_err(|e| XmlError::InvalidUtf8 {
        offset: (skipped + e.valid_up_to()) as u64,
    })?;
    if let Some((at, code_point)) = illegal_char(body) {
        return Err(XmlError::IllegalChar {
            offset: (skipped + at) as u64,
            code_point,
        });
    }
    Ok((text, skipped))
}

/// True for the encoding names that mean "these bytes are UTF-8" (ASCII is a subset).
pub(crate) fn is_utf8_name(name: &[u8]) -> bool {
    [&b"utf-8"[..], b"utf8", b"us-ascii", b"ascii"]
        .iter()
        .any(|n| n.eq_ignore_ascii_case(name))
}

/// Recognises UTF-16/UTF-32 by byte order mark or by the `<?` pattern of XML 1.0 appendix F,
/// so the caller gets "UTF-16" rather than a confusing "invalid UTF-8 at byte 0".
fn foreign_encoding(raw: &[u8]) -> Option<&'static str> {
    const PATTERNS: [(&[u8], &str); 6] = [
        (b"\x00\x00\xFE\xFF", "UTF-32BE (byte order mark)"),
        (b"\xFF\xFE\x00\x00", "UTF-32LE (byte order mark)"),
        (b"\xFE\xFF", "UTF-16BE (byte order mark)"),
        (b"\xFF\xFE", "UTF-16LE (byte order mark)"),
        (b"\x00<\x00?", "UTF-16BE (no byte order mark)"),
        (b"<\x00?\x00", "UTF-16LE (no byte order mark)"),
    ];
    PATTERNS
        .iter()
        .find(|(prefix, _)| raw.starts_with(prefix))
        .map(|(_, name)| *name)
}

/// The `encoding` pseudo-attribute of a leading XML declaration, if there is one. Looks at the
/// declaration only (bounded), never at the whole body.
fn declared_encoding(body: &[u8]) -> Option<&[u8]> {
    let rest = body.strip_prefix(b"<?xml")?;
    // A declaration is short; a missing `?>` within a few hundred bytes is left to the reader.
    let window = rest.get(..rest.len().min(512))?;
    let end = window.windows(2).position(|w| w == b"?>")?;
    let decl = window.get(..end)?;
    let at = decl.windows(8).position(|w| w == b"encoding")?;
    let mut value = decl.get(at + 8..)?.trim_ascii_start().strip_prefix(b"=")?;
    value = value.trim_ascii_start();
    let quote = *value.first()?;
    if quote != b'"' && quote != b'\'' {
        return None;
    }
    let inner = value.get(1..)?;
    let close = inner.iter().position(|&b| b == quote)?;
    inner.get(..close)
}

/// The first character XML 1.0 forbids, as (offset, code point). `text` is valid UTF-8, so the
/// only multi-byte sequences to catch are U+FFFE and U+FFFF (`EF BF BE`, `EF BF BF`); surrogates
/// cannot occur in valid UTF-8.
fn illegal_char(text: &[u8]) -> Option<(usize, u32)> {
    // Every form passes through here, so whole chunks are first tested without branches (the
    // compiler vectorises the fold); only a chunk with a suspicious byte is looked at closely.
    const CHUNK: usize = 64;
    let suspicious = |b: u8| (b < 0x20) & (b != b'\t') & (b != b'\n') & (b != b'\r') | (b == 0xEF);
    for (n, chunk) in text.chunks(CHUNK).enumerate() {
        if chunk.iter().fold(false, |acc, &b| acc | suspicious(b)) {
            let start = n * CHUNK;
            if let Some(found) = illegal_char_in(text, start, start + chunk.len()) {
                return Some(found);
            }
        }
    }
    None
}

/// The slow path of [`illegal_char`] over `text[start..end]`, looking past `end` for the tail of
/// a three-byte sequence.
fn illegal_char_in(text: &[u8], start: usize, end: usize) -> Option<(usize, u32)> {
    for (i, &b) in text.iter().enumerate().take(end).skip(start) {
        if b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r') {
            return Some((i, u32::from(b)));
        }
        if b == 0xEF && text.get(i + 1) == Some(&0xBF) {
            match text.get(i + 2) {
                Some(0xBE) => return Some((i, 0xFFFE)),
                Some(0xBF) => return Some((i, 0xFFFF)),
                _ => {}
            }
        }
    }
    None
}
