//! The payload's XML writer: quick-xml's `Writer` over a byte buffer, with the escaping the
//! payload needs.
//!
//! What must hold: the output is well-formed whatever the stored text is. Every text node and
//! attribute value goes through [`escape`], and an element name that is data goes through
//! [`is_xml_name`]; nothing else writes to the buffer.
//!
//! quick-xml writes the tags; its escapers are not used because they do less than a payload
//! needs and would change its bytes: `BytesText::new` and `Attribute::from((&str, &str))` write
//! `'` as `&apos;` (and `"` as `&quot;` in text), but leave `\r` (and `\t`, `\n` in attributes)
//! raw, which a parser's normalisation then turns into something else, and pass characters XML
//! 1.0 cannot carry (U+0000, U+001B, U+FFFE…), which makes the document ill-formed. So the text
//! is escaped here and handed to quick-xml as already escaped (`BytesText::from_escaped`, raw
//! attribute bytes).

use std::borrow::Cow;
use std::io;

use domain::CaseId;
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Writer;

/// An XML document being written; whitespace between elements is written explicitly
/// ([`Xml::line`], [`Xml::indent`]), so the layout is the payload's, not quick-xml's indenter's.
pub(crate) struct Xml {
    w: Writer<Vec<u8>>,
}

impl Xml {
    pub(crate) fn new() -> Self {
        Xml {
            w: Writer::new(Vec::new()),
        }
    }

    /// The document written so far.
    pub(crate) fn finish(self) -> String {
        // Only `&str` was written, so this is UTF-8 and `from_utf8` takes the buffer as it is.
        String::from_utf8(self.w.into_inner())
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    pub(crate) fn line(&mut self) -> io::Result<()> {
        self.w
            .write_event(Event::Text(BytesText::from_escaped("\n")))
    }

    pub(crate) fn indent(&mut self) -> io::Result<()> {
        self.w
            .write_event(Event::Text(BytesText::from_escaped("  ")))
    }

    fn start<'a>(tag: &'a str, attrs: &[(&str, &str)]) -> BytesStart<'a> {
        let mut start = BytesStart::new(tag);
        for (k, v) in attrs {
            let v = escape(v, true);
            start.push_attribute((k.as_bytes(), v.as_bytes()));
        }
        start
    }

    pub(crate) fn open(&mut self, tag: &str, attrs: &[(&str, &str)]) -> io::Result<()> {
        self.w.write_event(Event::Start(Self::start(tag, attrs)))
    }

    pub(crate) fn close(&mut self, tag: &str) -> io::Result<()> {
        self.w.write_event(Event::End(BytesEnd::new(tag)))
    }

    /// `<tag attrs>text</tag>`, or `<tag attrs/>` when `text` is empty.
    pub(crate) fn leaf(&mut self, tag: &str, attrs: &[(&str, &str)], text: &str) -> io::Result<()> {
        if text.is_empty() {
            return self.w.write_event(Event::Empty(Self::start(tag, attrs)));
        }
        self.open(tag, attrs)?;
        self.w
            .write_event(Event::Text(BytesText::from_escaped(escape(text, false))))?;
        self.close(tag)
    }

    /// A leaf whose element name is data (a property, index or attachment identifier).
    pub(crate) fn named_leaf(
        &mut self,
        case: &CaseId,
        name: &str,
        attrs: &[(&str, &str)],
        text: &str,
    ) -> io::Result<()> {
        if is_xml_name(name) {
            self.leaf(name, attrs, text)
        } else {
            // Names were element names when they were parsed, so this is a corrupt store.
            tracing::warn!(
                case_id = case.as_str(),
                name,
                "restore: skipping a name that is not an XML name"
            );
            Ok(())
        }
    }
}

/// Characters XML 1.0 can carry at all (its `Char` production).
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// Whether `c` is written other than as itself.
fn needs_escape(c: char, attribute: bool) -> bool {
    match c {
        '&' | '<' | '>' | '\r' => true,
        '"' | '\n' | '\t' => attribute,
        c => !is_xml_char(c),
    }
}

/// Escapes text or an attribute value. `\r` (and in attributes `\t`, `\n`) become character
/// references so a parser's line-end and attribute-value normalisation gives back the same text;
/// characters XML 1.0 cannot carry become U+FFFD. Borrows when there is nothing to escape.
pub(crate) fn escape(s: &str, attribute: bool) -> Cow<'_, str> {
    if !s.chars().any(|c| needs_escape(c, attribute)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attribute => out.push_str("&quot;"),
            '\r' => out.push_str("&#13;"),
            '\n' if attribute => out.push_str("&#10;"),
            '\t' if attribute => out.push_str("&#9;"),
            c if is_xml_char(c) => out.push(c),
            _ => out.push('\u{FFFD}'),
        }
    }
    Cow::Owned(out)
}

/// An XML name without a namespace prefix (a simplified `NCName`: the ASCII rules, and any
/// non-ASCII letter or digit).
pub(crate) fn is_xml_name(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    let start =
        |c: char| c == '_' || c.is_ascii_alphabetic() || (!c.is_ascii() && c.is_alphabetic());
    start(first)
        && chars.all(|c| {
            start(c)
                || c.is_ascii_digit()
                || c == '-'
                || c == '.'
                || (!c.is_ascii() && c.is_alphanumeric())
        })
}
