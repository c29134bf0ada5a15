//! The streaming walk over one submission: well-formedness, limits, meta (R1–R4) and finding
//! case blocks (R7, R8), in a single pass of quick-xml's `Reader`.
//!
//! No tree is built. The walker keeps one [`Open`] frame per open element (at most
//! `Limits::max_depth`), the namespace declarations in scope, the element path as one string,
//! the text of the leaf being read, and the output it has produced so far. What must hold:
//! - every event either advances the walk or ends it with an [`XmlError`]; nothing panics;
//! - work is linear in the input: namespace lookups are bounded by [`MAX_NAMESPACES_IN_SCOPE`]
//!   and duplicate-attribute checks switch to hashing for elements with many attributes;
//! - namespaces are resolved by `tag.rs` rather than quick-xml's `NsReader`: the walk reads
//!   every element's attributes anyway (duplicates, references) and needs a namespace only for
//!   prefixed elements, the root, `meta` and `case`, so one pass over the attributes does both
//!   (`NsReader` alone cost more than twice the plain `Reader` on a 3 KB form);
//! - a `case` element without a `case_id` attribute may still turn out to be a v1 block when a
//!   `case_id` child arrives (R7), so blocks found inside it are provisional until it closes.
//!
//! The meaning of a v2 block's content lives in `block.rs`, the reading of one tag in `tag.rs`;
//! this file routes events between them. It stays one file past 600 lines because `start` and
//! `end` are the two halves of one state machine over [`Frame`]s, best read side by side.

use std::fmt::Write as _;

use domain::{CaseBlock, ErrorCode, FormId, ParsedForm};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use sha2::{Digest, Sha256};

use crate::block::{
    clip, preview, ActionKind, BlockAttrs, BlockBuilder, CreateField, Field, Problems,
};
use crate::refs::{self, RefError};
use crate::tag::{self, Keep, Ns, Scope, TagError, MAX_NAMESPACES_IN_SCOPE};
use crate::{scan, Limits, XmlError};

/// R8: the only case namespace caseledger processes.
const CASE_V2: &str = "http://commcarehq.org/case/transaction/v2";
/// R2: the namespace of `<meta>`.
const JR_XFORMS: &str = "http://openrosa.org/jr/xforms";
/// R4: the root namespace of device logs.
const DEVICE_REPORT: &str = "http://code.javarosa.org/devicereport";

/// A `<meta>` child caseledger reads (R2, R78).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaField {
    InstanceId,
    UserId,
    Username,
    TimeEnd,
}

impl MetaField {
    fn from_local(local: &str) -> Option<Self> {
        match local {
            "instanceID" => Some(Self::InstanceId),
            "userID" => Some(Self::UserId),
            "username" => Some(Self::Username),
            "timeEnd" => Some(Self::TimeEnd),
            _ => None,
        }
    }
}

/// A `case` element without a `case_id` attribute, which R7 makes a block only if a `case_id`
/// child turns up.
#[derive(Debug)]
struct Candidate {
    /// A direct `case_id` child was seen: this is a block (v1 syntax).
    v1: bool,
    /// Text of the first `case_id` child, for messages.
    id: Option<String>,
    /// The element's namespace.
    namespace: String,
    /// Where it started.
    offset: u64,
    /// Output lengths when it started; blocks and problems after these are provisional.
    blocks_mark: usize,
    problems_mark: usize,
}

/// Text the walker collects outside blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Collect {
    Meta(MetaField),
    CandidateId,
}

/// What an open element is to the walk.
#[derive(Debug)]
enum Frame {
    /// The root element.
    Root,
    /// Ordinary form data outside any block: the search for blocks goes on below it.
    Plain,
    /// `<meta>` in the jr/xforms namespace, a direct child of the root (R2).
    Meta,
    /// A leaf outside blocks whose text is kept.
    Collect(Collect),
    /// See [`Candidate`].
    Candidate(Box<Candidate>),
    /// A v2 case block; its builder is `Walker::block`.
    Block,
    /// A case block in another namespace (R8): reported, content skipped.
    ForeignBlock,
    /// A direct child of a block that is an action (R10).
    Action(ActionKind),
    /// A leaf inside an action whose text is kept.
    Field { field: Field, has_children: bool },
    /// Anything else inside a block (no blocks inside blocks, R7).
    Inner,
}

#[derive(Debug)]
struct Open {
    frame: Frame,
    /// `Walker::path` length before this element's `/qname` was appended.
    path_len: usize,
    /// `Walker::scope` length before this element's declarations.
    bindings_len: usize,
    /// `Walker::text` length before this element; a collecting element's own text follows it
    /// (collecting elements can nest in hostile input, e.g. a `case_id` inside `instanceID`).
    text_len: usize,
}

/// Where the root element is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RootState {
    Before,
    Open,
    After,
}

struct Walker<'i, 'l> {
    reader: Reader<&'i [u8]>,
    /// The checked text the reader works on; every event borrows from it.
    input: &'i str,
    raw: &'i [u8],
    /// Bytes of the stripped byte order mark, added to every reported offset.
    base: u64,
    limits: &'l Limits,
    frames: Vec<Open>,
    /// `/root/child/…` of the open elements, as qualified names.
    path: String,
    /// Namespace declarations in scope.
    scope: Scope<'i>,
    root: RootState,
    xmlns: String,
    device_report: bool,
    instance_id: Option<String>,
    user_id: Option<String>,
    username: Option<String>,
    time_end: Option<String>,
    block: Option<BlockBuilder>,
    blocks: Vec<CaseBlock>,
    blocks_seen: usize,
    block_elements: usize,
    problems: Problems,
    /// Text of the `Collect` or `Field` leaf being read.
    text: String,
    /// Bytes of character data since the last tag, for `Limits::max_value_bytes`.
    run_len: usize,
}

/// Parses checked text; see [`crate::parse`].
pub(crate) fn parse(raw: &[u8], limits: &Limits) -> Result<ParsedForm, XmlError> {
    if raw.len() > limits.max_bytes {
        return Err(XmlError::TooLarge {
            size: raw.len(),
            max: limits.max_bytes,
        });
    }
    let (text, skipped) = scan::check(raw)?;
    let mut reader = Reader::from_str(text);
    // Defaults, stated because the walk relies on them: end names are checked, a lone `&` is
    // an error, `<a/>` stays one Empty event.
    let config = reader.config_mut();
    config.check_end_names = true;
    config.allow_dangling_amp = false;
    config.allow_unmatched_ends = false;
    config.expand_empty_elements = false;
    config.trim_text(false);
    Walker {
        reader,
        input: text,
        raw,
        base: skipped as u64,
        limits,
        frames: Vec::new(),
        path: String::new(),
        scope: Scope::default(),
        root: RootState::Before,
        xmlns: String::new(),
        device_report: false,
        instance_id: None,
        user_id: None,
        username: None,
        time_end: None,
        block: None,
        blocks: Vec::new(),
        blocks_seen: 0,
        block_elements: 0,
        problems: Problems::default(),
        text: String::new(),
        run_len: 0,
    }
    .run()
}

fn is_xml_space(s: &[u8]) -> bool {
    s.iter().all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

fn utf8(bytes: &[u8]) -> &str {
    // The input passed `scan::check`, and quick-xml splits names and values at ASCII bytes, so
    // this never fails; should it, the caller sees an empty name rather than a panic.
    std::str::from_utf8(bytes).unwrap_or_default()
}

impl<'i> Walker<'i, '_> {
    fn run(mut self) -> Result<ParsedForm, XmlError> {
        loop {
            let pos = self.reader.buffer_position();
            let event = match self.reader.read_event() {
                Ok(event) => event,
                Err(e) => return Err(self.reader_error(e)),
            };
            match event {
                Event::Start(e) => self.start(&e, pos)?,
                Event::Empty(e) => {
                    self.start(&e, pos)?;
                    self.end()?;
                }
                Event::End(_) => self.end()?,
                Event::Text(t) => {
                    if self.inside_root(is_xml_space(&t), "text", pos)? {
                        // XML 1.0 §2.4: `]]>` may not appear in content (lxml, and so HQ,
                        // refuses it too). `>` is rare in text, so look for it first.
                        if t.contains(&b'>') && t.windows(3).any(|w| w == b"]]>") {
                            return Err(self.malformed(pos, "`]]>` in text"));
                        }
                        self.character_data(t.len(), pos)?;
                        if self.collecting() {
                            let s = t.xml10_content().map_err(|e| self.malformed(pos, e))?;
                            self.text.push_str(&s);
                        }
                    }
                }
                Event::CData(t) => {
                    if self.inside_root(false, "a CDATA section", pos)? {
                        self.character_data(t.len(), pos)?;
                        if self.collecting() {
                            let s = t.xml10_content().map_err(|e| self.malformed(pos, e))?;
                            self.text.push_str(&s);
                        }
                    }
                }
                Event::GeneralRef(r) => {
                    if self.inside_root(false, "a reference", pos)? {
                        let c = refs::resolve(utf8(&r))
                            .map_err(|e| self.ref_error(e, self.base + pos))?;
                        self.character_data(c.len_utf8(), pos)?;
                        if self.collecting() {
                            self.text.push(c);
                        }
                    }
                }
                Event::Decl(d) => {
                    if pos != 0 {
                        return Err(self.malformed(pos, "XML declaration not at the start"));
                    }
                    // `scan` has refused foreign encodings already; this covers declarations
                    // its quick look did not understand.
                    match d.encoding() {
                        Some(Ok(enc)) if !scan::is_utf8_name(&enc) => {
                            return Err(XmlError::UnsupportedEncoding {
                                encoding: format!("{:?} (declared)", String::from_utf8_lossy(&enc)),
                            })
                        }
                        Some(Err(e)) => return Err(self.malformed(pos, e)),
                        _ => {}
                    }
                }
                // R50: never read a DTD, so no entity is ever declared or expanded.
                Event::DocType(_) => {
                    return Err(XmlError::Doctype {
                        offset: self.base + pos,
                    })
                }
                Event::Comment(_) | Event::PI(_) => {}
                Event::Eof => return self.finish(),
            }
        }
    }

    fn finish(self) -> Result<ParsedForm, XmlError> {
        match self.root {
            RootState::Before => return Err(XmlError::NoRoot),
            RootState::Open => {
                return Err(XmlError::Truncated {
                    path: self.path.clone(),
                })
            }
            RootState::After => {}
        }
        // R3: without an instanceID the form is named by its content.
        let instance_id = match self.instance_id {
            Some(id) => FormId(id),
            None => {
                let mut id = String::with_capacity(7 + 64);
                id.push_str("sha256:");
                for b in Sha256::digest(self.raw) {
                    // Writing to a String cannot fail.
                    let _ = write!(id, "{b:02x}");
                }
                FormId(id)
            }
        };
        Ok(ParsedForm {
            instance_id,
            xmlns: self.xmlns,
            user_id: self.user_id,
            username: self.username,
            time_end: self.time_end,
            device_report: self.device_report,
            blocks: self.blocks,
            problems: self.problems.into_vec(),
        })
    }

    // ---- character data -------------------------------------------------------------------

    /// Where character data is allowed: inside the root anything, outside it only whitespace
    /// (which is then skipped). Returns true when the content is inside the root.
    fn inside_root(
        &self,
        whitespace: bool,
        found: &'static str,
        pos: u64,
    ) -> Result<bool, XmlError> {
        if self.root == RootState::Open {
            return Ok(true);
        }
        if whitespace {
            return Ok(false);
        }
        Err(XmlError::ContentOutsideRoot {
            offset: self.base + pos,
            found,
        })
    }

    /// Counts character data towards `Limits::max_value_bytes`.
    fn character_data(&mut self, len: usize, pos: u64) -> Result<(), XmlError> {
        self.run_len = self.run_len.saturating_add(len);
        if self.run_len > self.limits.max_value_bytes {
            return Err(XmlError::ValueTooLarge {
                offset: self.base + pos,
                path: self.path.clone(),
                max: self.limits.max_value_bytes,
            });
        }
        Ok(())
    }

    fn collecting(&self) -> bool {
        matches!(
            self.frames.last().map(|o| &o.frame),
            Some(Frame::Collect(_) | Frame::Field { .. })
        )
    }

    // ---- elements ---------------------------------------------------------------------------

    fn in_input(&self, part: &[u8], pos: u64) -> Result<&'i str, XmlError> {
        tag::in_input(self.input, part)
            .ok_or_else(|| self.malformed(pos, "reader returned text that is not in the input"))
    }

    fn start(&mut self, e: &BytesStart<'i>, pos: u64) -> Result<(), XmlError> {
        self.run_len = 0;
        let offset = self.base + pos;
        let text = self.in_input(e, pos)?;
        let name_len = e.name().as_ref().len();
        let qname = text.get(..name_len).unwrap_or_default();
        if !tag::is_qname(qname) {
            return Err(self.malformed(pos, format_args!("{qname:?} is not an element name")));
        }
        if self.root == RootState::After {
            return Err(XmlError::ContentOutsideRoot {
                offset,
                found: "an element",
            });
        }
        let (prefix, local) = tag::split_qname(qname);
        let path_len = self.path.len();
        self.path.push('/');
        self.path.push_str(qname);
        // R50: nesting deeper than max_depth (the root is depth 1).
        if self.frames.len() >= self.limits.max_depth {
            return Err(XmlError::TooDeep {
                offset,
                path: self.path.clone(),
                max: self.limits.max_depth,
            });
        }

        if self.block.is_some() {
            // Bounds memory: every element in a block may become a stored value.
            self.block_elements += 1;
            if self.block_elements > self.limits.max_block_elements {
                return Err(XmlError::TooManyBlockElements {
                    offset,
                    max: self.limits.max_block_elements,
                });
            }
        }
        let bindings_len = self.scope.len();
        let keep = self.keep(local);
        let attrs = tag::read_attributes(
            self.input,
            text,
            name_len,
            keep,
            self.limits.max_value_bytes,
            &mut self.scope,
        )
        .map_err(|e| self.tag_error(e, offset))?;
        // Only prefixed elements (which may be undeclared), the root, `meta` and `case` need
        // their namespace; for every other element `ns` is never looked at.
        let ns = if prefix.is_some() || self.frames.is_empty() || local == "case" || local == "meta"
        {
            self.scope
                .resolve(prefix)
                .ok_or_else(|| XmlError::UndeclaredPrefix {
                    offset,
                    path: self.path.clone(),
                    prefix: prefix.unwrap_or_default().to_owned(),
                })?
        } else {
            Ns::Unbound
        };

        // R50 UsesReferrals: a `<referral>` anywhere inside a v2 block.
        if local == "referral" {
            if let Some(block) = self.block.as_mut() {
                block.referral(&self.path, &mut self.problems);
            }
        }

        let meta_field = MetaField::from_local(local);
        let is_jr_meta = local == "meta" && self.scope.uri(ns) == JR_XFORMS;
        let frame = match self.frames.last_mut().map(|o| &mut o.frame) {
            None => {
                // R1: the root's namespace is the form's xmlns. R4: device logs get no case
                // processing. The root itself is never a case block: HQ looks for blocks in
                // the form's content, below the root.
                self.xmlns = self.scope.uri(ns).to_owned();
                self.device_report = self.xmlns == DEVICE_REPORT;
                self.root = RootState::Open;
                Frame::Root
            }
            Some(Frame::Block) => match ActionKind::from_local(local) {
                Some(kind) => {
                    if let Some(block) = self.block.as_mut() {
                        block.action(kind);
                    }
                    Frame::Action(kind)
                }
                // R10: unknown children of a block are ignored.
                None => Frame::Inner,
            },
            Some(Frame::Action(kind)) => match kind {
                ActionKind::Create => match CreateField::from_local(local) {
                    Some(f) => Frame::Field {
                        field: Field::Create(f),
                        has_children: false,
                    },
                    None => Frame::Inner,
                },
                ActionKind::Update => Frame::Field {
                    field: Field::Update(local.to_owned()),
                    has_children: false,
                },
                ActionKind::Index => Frame::Field {
                    field: Field::Index {
                        identifier: local.to_owned(),
                        case_type: attrs.case_type,
                        relationship: attrs.relationship,
                    },
                    has_children: false,
                },
                ActionKind::Attachment => {
                    if let Some(block) = self.block.as_mut() {
                        block.attachment(local, attrs.src, attrs.from, attrs.name);
                    }
                    Frame::Inner
                }
                ActionKind::Close => Frame::Inner,
            },
            Some(Frame::Field { has_children, .. }) => {
                *has_children = true;
                Frame::Inner
            }
            Some(Frame::Inner | Frame::ForeignBlock) => Frame::Inner,
            Some(Frame::Meta) if meta_field.is_some() => {
                meta_field.map_or(Frame::Plain, |f| Frame::Collect(Collect::Meta(f)))
            }
            Some(Frame::Candidate(c)) if local == "case_id" => {
                // R7: a `case_id` child makes the enclosing `case` a (v1-style) block.
                c.v1 = true;
                Frame::Collect(Collect::CandidateId)
            }
            Some(Frame::Root) if is_jr_meta => Frame::Meta,
            Some(
                Frame::Root | Frame::Plain | Frame::Meta | Frame::Collect(_) | Frame::Candidate(_),
            ) => self.outside_block(local, qname, ns, attrs.block, offset)?,
        };
        self.frames.push(Open {
            frame,
            path_len,
            bindings_len,
            text_len: self.text.len(),
        });
        Ok(())
    }

    /// An element below the root and outside any block: R7 decides whether it starts a block.
    fn outside_block(
        &mut self,
        local: &str,
        qname: &str,
        ns: Ns,
        attrs: BlockAttrs,
        offset: u64,
    ) -> Result<Frame, XmlError> {
        if local != "case" || self.device_report {
            return Ok(Frame::Plain);
        }
        let is_v2 = self.scope.uri(ns) == CASE_V2;
        if attrs.case_id.is_none() {
            // R7: no case_id attribute; a `case_id` child may still make it a block.
            return Ok(Frame::Candidate(Box::new(Candidate {
                v1: false,
                id: None,
                namespace: self.scope.uri(ns).to_owned(),
                offset,
                blocks_mark: self.blocks.len(),
                problems_mark: self.problems.mark(),
            })));
        }
        self.count_block(offset)?;
        if is_v2 {
            self.block = Some(BlockBuilder::start(
                attrs,
                &clip(qname),
                offset,
                &mut self.problems,
            ));
            return Ok(Frame::Block);
        }
        // R8: any namespace but v2 is refused; the content is not interpreted.
        let id = preview(attrs.case_id.as_deref().unwrap_or_default().trim());
        let namespace = match self.scope.uri(ns) {
            "" => "no namespace".to_owned(),
            uri => format!("namespace {}", preview(uri)),
        };
        self.problems.push(
            ErrorCode::UnsupportedCaseVersion,
            format!(
                "case {id}: <{}> at byte {offset} is in {namespace}; only CaseXML v2 \
                 ({CASE_V2}) is supported",
                clip(qname)
            ),
        );
        Ok(Frame::ForeignBlock)
    }

    fn count_block(&mut self, offset: u64) -> Result<(), XmlError> {
        self.blocks_seen += 1;
        if self.blocks_seen > self.limits.max_blocks {
            return Err(XmlError::TooManyBlocks {
                offset,
                max: self.limits.max_blocks,
            });
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), XmlError> {
        self.run_len = 0;
        let Some(open) = self.frames.pop() else {
            // quick-xml reports unmatched end tags itself; this is a second line of defence.
            return Err(self.malformed(self.reader.buffer_position(), "end tag without start tag"));
        };
        self.scope.truncate(open.bindings_len);
        // Take the path and text out so they can be borrowed while `self` is mutated.
        let path = std::mem::take(&mut self.path);
        let text = std::mem::take(&mut self.text);
        let qname = path.get(open.path_len + 1..).unwrap_or_default();
        let own_text = text.get(open.text_len..).unwrap_or_default();
        let result = self.close(open.frame, &clip(qname), own_text);
        self.path = path;
        self.path.truncate(open.path_len);
        self.text = text;
        self.text.truncate(open.text_len);
        result
    }

    /// An element has ended; `text` is its character data if it was a collecting element.
    fn close(&mut self, frame: Frame, qname: &str, text: &str) -> Result<(), XmlError> {
        match frame {
            Frame::Root => self.root = RootState::After,
            Frame::Collect(Collect::Meta(field)) => {
                let value = text.trim();
                // R2: empty meta values count as absent; the first non-empty value wins.
                if !value.is_empty() {
                    let slot = match field {
                        MetaField::InstanceId => &mut self.instance_id,
                        MetaField::UserId => &mut self.user_id,
                        MetaField::Username => &mut self.username,
                        MetaField::TimeEnd => &mut self.time_end,
                    };
                    if slot.is_none() {
                        *slot = Some(value.to_owned());
                    }
                }
            }
            Frame::Collect(Collect::CandidateId) => {
                if let Some(Open {
                    frame: Frame::Candidate(c),
                    ..
                }) = self.frames.last_mut()
                {
                    c.id.get_or_insert_with(|| text.trim().to_owned());
                }
            }
            Frame::Candidate(c) => self.close_candidate(*c, qname)?,
            Frame::Block => {
                if let Some(block) = self.block.take() {
                    self.blocks.push(block.finish(&mut self.problems));
                }
            }
            Frame::Field {
                field,
                has_children,
            } => {
                if let Some(block) = self.block.as_mut() {
                    block.finish_field(field, has_children, text, qname, &mut self.problems);
                }
            }
            Frame::Plain | Frame::Meta | Frame::ForeignBlock | Frame::Action(_) | Frame::Inner => {}
        }
        Ok(())
    }

    /// A `case` element without a case_id attribute has ended. With a `case_id` child it was a
    /// block after all (R7): what was found inside it is dropped (no blocks inside blocks) and
    /// the block is reported — UnsupportedCaseVersion for v1 or another namespace (R8), or
    /// IllegalCaseId in the v2 namespace, whose blocks need the case_id attribute (R9).
    fn close_candidate(&mut self, c: Candidate, qname: &str) -> Result<(), XmlError> {
        if !c.v1 {
            return Ok(());
        }
        self.count_block(c.offset)?;
        self.blocks.truncate(c.blocks_mark);
        self.problems.truncate(c.problems_mark);
        let id = preview(&c.id.unwrap_or_default());
        let offset = c.offset;
        if c.namespace == CASE_V2 {
            self.problems.push(
                ErrorCode::IllegalCaseId,
                format!(
                    "case block <{qname}> at byte {offset} has no case_id attribute (its \
                     <case_id> child {id} is CaseXML v1 syntax)"
                ),
            );
        } else {
            let namespace = if c.namespace.is_empty() {
                "no namespace".to_owned()
            } else {
                format!("namespace {}", preview(&c.namespace))
            };
            self.problems.push(
                ErrorCode::UnsupportedCaseVersion,
                format!(
                    "case {id}: <{qname}> at byte {offset} is a CaseXML v1 block in \
                     {namespace}; only CaseXML v2 ({CASE_V2}) is supported"
                ),
            );
        }
        Ok(())
    }

    /// Which attributes the element about to be classified needs.
    fn keep(&self, local: &str) -> Keep {
        match self.frames.last().map(|o| &o.frame) {
            Some(Frame::Action(ActionKind::Index)) => Keep::Index,
            Some(Frame::Action(ActionKind::Attachment)) => Keep::Attachment,
            Some(
                Frame::Root | Frame::Plain | Frame::Meta | Frame::Collect(_) | Frame::Candidate(_),
            ) if local == "case" => Keep::Block,
            _ => Keep::Nothing,
        }
    }

    // ---- errors -----------------------------------------------------------------------------

    fn where_(&self) -> String {
        if self.path.is_empty() {
            "/".to_owned()
        } else {
            self.path.clone()
        }
    }

    fn malformed(&self, pos: u64, detail: impl std::fmt::Display) -> XmlError {
        XmlError::Malformed {
            offset: self.base + pos,
            path: self.where_(),
            detail: detail.to_string(),
        }
    }

    fn ref_error(&self, err: RefError, offset: u64) -> XmlError {
        let path = self.where_();
        match err {
            RefError::UnknownEntity(name) => XmlError::UnknownEntity { offset, path, name },
            RefError::IllegalCharRef(reference) => XmlError::IllegalCharRef {
                offset,
                path,
                reference,
            },
            RefError::Unterminated => XmlError::Malformed {
                offset,
                path,
                detail: "`&` without a closing `;` in an attribute value".into(),
            },
            RefError::LessThan => XmlError::Malformed {
                offset,
                path,
                detail: "`<` in an attribute value".into(),
            },
        }
    }

    fn tag_error(&self, e: TagError, offset: u64) -> XmlError {
        let path = self.where_();
        match e {
            TagError::Syntax(detail) => XmlError::Malformed {
                offset,
                path,
                detail,
            },
            TagError::BadName(name) => XmlError::Malformed {
                offset,
                path,
                detail: format!("{name:?} is not an attribute name"),
            },
            TagError::Duplicate(name) => XmlError::DuplicateAttribute { offset, path, name },
            TagError::ValueTooLarge(name) => XmlError::ValueTooLarge {
                offset,
                path: format!("{path}/@{name}"),
                max: self.limits.max_value_bytes,
            },
            TagError::Ref(err) => self.ref_error(err, offset),
            TagError::UndeclaredPrefix(prefix) => XmlError::UndeclaredPrefix {
                offset,
                path,
                prefix,
            },
            TagError::ReservedPrefix(detail) => XmlError::Malformed {
                offset,
                path,
                detail: detail.into(),
            },
            TagError::TooManyNamespaces => XmlError::TooManyNamespaces {
                offset,
                path,
                max: MAX_NAMESPACES_IN_SCOPE,
            },
        }
    }

    fn reader_error(&self, e: quick_xml::Error) -> XmlError {
        use quick_xml::errors::IllFormedError;
        let offset = self.base + self.reader.error_position();
        match e {
            quick_xml::Error::IllFormed(IllFormedError::MismatchedEndTag { expected, found }) => {
                XmlError::MismatchedEndTag {
                    offset,
                    path: self.where_(),
                    expected,
                    found,
                }
            }
            other => XmlError::Malformed {
                offset,
                path: self.where_(),
                detail: other.to_string(),
            },
        }
    }
}
