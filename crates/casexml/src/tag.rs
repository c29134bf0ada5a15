//! One start tag: its names, its attributes and the namespace declarations it brings into
//! scope (XML 1.0 §3.1 and §3.3.3, Namespaces in XML 1.0).
//!
//! quick-xml splits a tag into a name and attribute spans but checks little more. Here every
//! attribute is validated (name, duplicate, size, references) in the same pass that reads the
//! ones the walk needs and the `xmlns` declarations, so a tag is looked at once. [`Scope`]
//! answers "which namespace does this prefix mean here?". What must hold:
//! - work is linear in the tag: duplicate checks switch from a short array to a hash set, and
//!   the number of declarations in scope is bounded by [`MAX_NAMESPACES_IN_SCOPE`], because
//!   every lookup walks them;
//! - names and values borrow the input (`'i`) and are copied only when kept.

use std::borrow::Cow;
use std::collections::HashSet;

use quick_xml::events::attributes::Attributes;

use crate::block::BlockAttrs;
use crate::refs::{self, RefError};

/// The namespace the `xml` prefix is bound to without a declaration (Namespaces in XML §3).
const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";
/// Namespace declarations in scope at once. Real forms use under ten; the bound keeps prefix
/// lookups cheap in a crafted 16 MiB document.
pub(crate) const MAX_NAMESPACES_IN_SCOPE: usize = 256;
/// Attributes on one element checked for duplicates by linear search before switching to a set.
const LINEAR_DUPLICATE_CHECK: usize = 16;

/// Why a tag was refused; the walker adds the offset and element path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TagError {
    /// quick-xml could not split the attributes (missing quote, missing `=`, …).
    Syntax(String),
    /// An attribute name that is not a name.
    BadName(String),
    /// The same attribute twice.
    Duplicate(String),
    /// An attribute value longer than `Limits::max_value_bytes`; carries the attribute name.
    ValueTooLarge(String),
    /// A reference or `<` in an attribute value.
    Ref(RefError),
    /// An attribute prefix with no declaration in scope.
    UndeclaredPrefix(String),
    /// A declaration Namespaces in XML 1.0 forbids.
    ReservedPrefix(&'static str),
    /// More than [`MAX_NAMESPACES_IN_SCOPE`] declarations in scope.
    TooManyNamespaces,
}

/// A loose check of the XML `QName` production: one optional prefix, each part non-empty, not
/// starting with a digit, `-` or `.`, and made of letters, digits, `_`, `-`, `.` or non-ASCII.
/// quick-xml splits names at whitespace, `/` and `>` but accepts anything else (`< a`, `<a&b>`).
pub(crate) fn is_qname(name: &str) -> bool {
    let mut colon = false;
    let mut at_start = true;
    for &b in name.as_bytes() {
        if b == b':' {
            if colon || at_start {
                return false;
            }
            colon = true;
            at_start = true;
        } else if at_start {
            if !(b.is_ascii_alphabetic() || b == b'_' || b >= 0x80) {
                return false;
            }
            at_start = false;
        } else if !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') || b >= 0x80) {
            return false;
        }
    }
    !at_start
}

/// Splits a checked qualified name into prefix and local name.
pub(crate) fn split_qname(qname: &str) -> (Option<&str>, &str) {
    match qname.bytes().position(|b| b == b':') {
        Some(i) => (qname.get(..i), qname.get(i + 1..).unwrap_or_default()),
        None => (None, qname),
    }
}

/// `part` as a slice of `input` with the input's lifetime. quick-xml's events over a `&str`
/// borrow it, so this recovers the lifetime its borrowing API hides; `None` if `part` lies
/// elsewhere or not on character boundaries.
pub(crate) fn in_input<'i>(input: &'i str, part: &[u8]) -> Option<&'i str> {
    let start = (part.as_ptr() as usize).wrapping_sub(input.as_ptr() as usize);
    let end = start.checked_add(part.len())?;
    input.get(start..end)
}

/// An element's namespace: none, a declaration in [`Scope`], or the `xml` namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ns {
    Unbound,
    At(usize),
    Xml,
}

/// One `xmlns[:prefix]="uri"` declaration in scope.
#[derive(Debug)]
struct Binding<'i> {
    /// Empty for the default namespace.
    prefix: &'i str,
    /// Empty for `xmlns=""` (no default namespace).
    uri: Cow<'i, str>,
}

/// The namespace declarations in scope, outermost first.
#[derive(Debug, Default)]
pub(crate) struct Scope<'i> {
    bindings: Vec<Binding<'i>>,
}

impl<'i> Scope<'i> {
    /// How many declarations are in scope; pass it to [`Scope::truncate`] when the element ends.
    pub(crate) fn len(&self) -> usize {
        self.bindings.len()
    }

    /// Ends the declarations made since `len`.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.bindings.truncate(len);
    }

    /// Puts `xmlns[:prefix]="uri"` in scope.
    fn bind(&mut self, prefix: &'i str, uri: Cow<'i, str>) -> Result<(), TagError> {
        match prefix {
            "xmlns" => {
                return Err(TagError::ReservedPrefix(
                    "the xmlns prefix cannot be declared",
                ))
            }
            "xml" if uri != XML_NS => {
                return Err(TagError::ReservedPrefix(
                    "the xml prefix cannot be bound to another namespace",
                ))
            }
            p if !p.is_empty() && uri.is_empty() => {
                return Err(TagError::ReservedPrefix(
                    "a prefix cannot be undeclared with an empty namespace in XML 1.0",
                ))
            }
            _ => {}
        }
        if self.bindings.len() >= MAX_NAMESPACES_IN_SCOPE {
            return Err(TagError::TooManyNamespaces);
        }
        self.bindings.push(Binding { prefix, uri });
        Ok(())
    }

    /// The namespace of an element name with this prefix; `None` when the prefix is undeclared.
    pub(crate) fn resolve(&self, prefix: Option<&str>) -> Option<Ns> {
        match prefix {
            None => Some(
                match self.bindings.iter().rposition(|b| b.prefix.is_empty()) {
                    Some(i) if self.bindings.get(i).is_some_and(|b| !b.uri.is_empty()) => Ns::At(i),
                    _ => Ns::Unbound,
                },
            ),
            Some("xml") => Some(Ns::Xml),
            Some(p) => self
                .bindings
                .iter()
                .rposition(|b| b.prefix == p)
                .map(Ns::At),
        }
    }

    /// The namespace URI, empty for none.
    pub(crate) fn uri(&self, ns: Ns) -> &str {
        match ns {
            Ns::Unbound => "",
            Ns::At(i) => self.bindings.get(i).map_or("", |b| &b.uri),
            Ns::Xml => XML_NS,
        }
    }
}

/// Which attributes to keep for the element being read (all are validated either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    Nothing,
    /// `case_id`, `date_modified`, `user_id` of a possible case block (R9).
    Block,
    /// `case_type`, `relationship` of an index child (R25–R27).
    Index,
    /// `src`, `from`, `name` of an attachment child (R31).
    Attachment,
}

/// The attributes of one element that the walk needs, unescaped and normalised.
#[derive(Debug, Default)]
pub(crate) struct Attrs {
    pub(crate) block: BlockAttrs,
    pub(crate) case_type: Option<String>,
    pub(crate) relationship: Option<String>,
    pub(crate) src: Option<String>,
    pub(crate) from: Option<String>,
    pub(crate) name: Option<String>,
}

/// Reads the attributes of `tag` (the text between `<` and `>` or `/>`, whose first `name_len`
/// bytes are the element name): validates each, puts its declarations in `scope` and returns
/// the attributes `keep` asks for. Only unprefixed attributes are kept: CaseXML writes them so,
/// and `n0:case_id` is a different attribute by the Namespaces spec.
pub(crate) fn read_attributes<'i>(
    input: &'i str,
    tag: &'i str,
    name_len: usize,
    keep: Keep,
    max_value_bytes: usize,
    scope: &mut Scope<'i>,
) -> Result<Attrs, TagError> {
    let mut out = Attrs::default();
    let mut seen: [&str; LINEAR_DUPLICATE_CHECK] = [""; LINEAR_DUPLICATE_CHECK];
    let mut seen_len = 0;
    let mut seen_set: Option<HashSet<&str>> = None;
    let mut prefixes: Vec<&str> = Vec::new();
    for attr in Attributes::new(tag, name_len).with_checks(false) {
        let attr = attr.map_err(|e| TagError::Syntax(e.to_string()))?;
        let key = in_input(input, attr.key.into_inner()).unwrap_or_default();
        if !is_qname(key) {
            return Err(TagError::BadName(key.to_owned()));
        }
        let duplicate = match seen_set.as_mut() {
            Some(set) => !set.insert(key),
            None => {
                let dup = seen.get(..seen_len).unwrap_or_default().contains(&key);
                match seen.get_mut(seen_len) {
                    Some(slot) => {
                        *slot = key;
                        seen_len += 1;
                    }
                    None => {
                        let mut set: HashSet<&str> = seen.iter().copied().collect();
                        set.insert(key);
                        seen_set = Some(set);
                    }
                }
                dup
            }
        };
        if duplicate {
            return Err(TagError::Duplicate(key.to_owned()));
        }
        if attr.value.len() > max_value_bytes {
            return Err(TagError::ValueTooLarge(key.to_owned()));
        }
        let raw_value = in_input(input, &attr.value).unwrap_or_default();
        let value = refs::attribute_value(raw_value).map_err(TagError::Ref)?;
        let slot = match (keep, split_qname(key)) {
            (_, (None, "xmlns")) => {
                scope.bind("", value)?;
                continue;
            }
            (_, (Some("xmlns"), prefix)) => {
                scope.bind(prefix, value)?;
                continue;
            }
            (_, (Some(prefix), _)) => {
                prefixes.push(prefix);
                continue;
            }
            (Keep::Block, (None, "case_id")) => &mut out.block.case_id,
            (Keep::Block, (None, "date_modified")) => &mut out.block.date_modified,
            (Keep::Block, (None, "user_id")) => &mut out.block.user_id,
            (Keep::Index, (None, "case_type")) => &mut out.case_type,
            (Keep::Index, (None, "relationship")) => &mut out.relationship,
            (Keep::Attachment, (None, "src")) => &mut out.src,
            (Keep::Attachment, (None, "from")) => &mut out.from,
            (Keep::Attachment, (None, "name")) => &mut out.name,
            _ => continue,
        };
        *slot = Some(value.into_owned());
    }
    // A prefix may be declared anywhere on the same tag, so attribute prefixes are checked
    // once all of the tag's declarations are in scope.
    for prefix in prefixes {
        if scope.resolve(Some(prefix)).is_none() {
            return Err(TagError::UndeclaredPrefix(prefix.to_owned()));
        }
    }
    Ok(out)
}
