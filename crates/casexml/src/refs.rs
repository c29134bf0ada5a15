//! Entity and character references, and attribute-value normalisation (XML 1.0 §4.1, §3.3.3).
//!
//! caseledger never expands a declared entity (DTDs are refused, R50): the only references that
//! resolve are the five predefined entities and character references to characters XML 1.0
//! allows. Everything else is an error the caller turns into `InvalidXml`.

use std::borrow::Cow;

/// Why a reference or an attribute value was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RefError {
    /// `&name;` where `name` is not predefined. Carries the name.
    UnknownEntity(String),
    /// `&#…;` that is malformed or names an illegal character. Carries the text between `&`
    /// and `;`.
    IllegalCharRef(String),
    /// `&` without a closing `;` in an attribute value.
    Unterminated,
    /// A literal `<` in an attribute value.
    LessThan,
}

/// True for the characters of the XML 1.0 `Char` production.
pub(crate) fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Resolves the text between `&` and `;`.
pub(crate) fn resolve(name: &str) -> Result<char, RefError> {
    match name {
        "lt" => Ok('<'),
        "gt" => Ok('>'),
        "amp" => Ok('&'),
        "apos" => Ok('\''),
        "quot" => Ok('"'),
        _ => match name.strip_prefix('#') {
            Some(number) => char_ref(number).ok_or_else(|| RefError::IllegalCharRef(name.into())),
            None => Err(RefError::UnknownEntity(name.into())),
        },
    }
}

/// `#x1F` / `#31` (without the `#`) to a legal character. Only lowercase `x` is XML.
fn char_ref(number: &str) -> Option<char> {
    let (digits, radix) = match number.strip_prefix('x') {
        Some(hex) => (hex, 16),
        None => (number, 10),
    };
    // `from_str_radix` accepts a leading `+`, XML does not; the length bound keeps it cheap.
    if digits.is_empty() || digits.len() > 8 || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let code = u32::from_str_radix(digits, radix).ok()?;
    char::from_u32(code).filter(|&c| is_xml_char(c))
}

/// An attribute value as the application sees it: references resolved, and each literal tab,
/// newline or carriage return (a CR LF pair counts once) replaced by a space (XML 1.0 §3.3.3).
/// Borrows when there is nothing to change, which is almost always.
pub(crate) fn attribute_value(raw: &str) -> Result<Cow<'_, str>, RefError> {
    if !raw
        .bytes()
        .any(|b| matches!(b, b'&' | b'<' | b'\t' | b'\n' | b'\r'))
    {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(c) = rest.chars().next() {
        rest = rest.get(c.len_utf8()..).unwrap_or("");
        match c {
            '<' => return Err(RefError::LessThan),
            '&' => {
                let end = rest.find(';').ok_or(RefError::Unterminated)?;
                out.push(resolve(rest.get(..end).unwrap_or(""))?);
                rest = rest.get(end + 1..).unwrap_or("");
            }
            '\r' => {
                out.push(' ');
                rest = rest.strip_prefix('\n').unwrap_or(rest);
            }
            '\t' | '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    Ok(Cow::Owned(out))
}
