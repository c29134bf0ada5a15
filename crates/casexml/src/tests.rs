//! Tests for `casexml`: one named test per rule (R1–R78 as they touch parsing), the real
//! conformance forms, the hostile corpus under `tests/data/hostile/`, generated giant inputs,
//! and properties (no input panics; values round-trip).
//!
//! One long file rather than several because every part builds forms with the same few helpers
//! at the top, and a rule's tests are easiest to find by searching for its number here.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use domain::{ErrorCode, ParsedForm, Relationship, Timestamp};
use proptest::prelude::*;

use super::*;

const V2: &str = "http://commcarehq.org/case/transaction/v2";
const JR: &str = "http://openrosa.org/jr/xforms";
const FORM_NS: &str = "http://openrosa.org/formdesigner/7A1C2F4E-3B9D-4E0A-8C51-2D6F0B9E4A13";

/// A form in CommCare's wire shape with `body` before the meta block.
fn form(body: &str) -> String {
    format!(
        "<?xml version='1.0' ?><data xmlns:jrm=\"http://dev.commcarehq.org/jr/xforms\" \
         xmlns=\"{FORM_NS}\" uiVersion=\"1\" version=\"31\" name=\"Test\">{body}\
         <n1:meta xmlns:n1=\"{JR}\"><n1:deviceID>d-1</n1:deviceID>\
         <n1:timeEnd>2026-03-02T09:15:22.104+03:00</n1:timeEnd><n1:username>david</n1:username>\
         <n1:userID>u-david</n1:userID><n1:instanceID>f-1</n1:instanceID></n1:meta></data>"
    )
}

/// A v2 block with the given attributes (raw text, e.g. `case_id="c-1"`) and content.
fn block_with(attrs: &str, inner: &str) -> String {
    format!("<n0:case xmlns:n0=\"{V2}\" {attrs}>{inner}</n0:case>")
}

/// A v2 block for `case_id` with a date and a user.
fn block(case_id: &str, inner: &str) -> String {
    block_with(
        &format!(
            "case_id=\"{case_id}\" date_modified=\"2026-03-02T09:15:22.104+03:00\" user_id=\"u-david\""
        ),
        inner,
    )
}

const CREATE: &str = "<n0:create><n0:case_name>Monica</n0:case_name>\
                      <n0:case_type>pregnancy</n0:case_type></n0:create>";

fn ok(xml: &str) -> ParsedForm {
    match parse(xml.as_bytes(), &Limits::default()) {
        Ok(f) => f,
        Err(e) => panic!("expected a form, got {e}\n{xml}"),
    }
}

fn err(xml: impl AsRef<[u8]>) -> XmlError {
    match parse(xml.as_ref(), &Limits::default()) {
        Ok(f) => panic!("expected an XmlError, got {f:?}"),
        Err(e) => e,
    }
}

fn codes(f: &ParsedForm) -> Vec<ErrorCode> {
    f.problems.iter().map(|p| p.code).collect()
}

fn only_problem(f: &ParsedForm, code: ErrorCode) -> String {
    assert_eq!(codes(f), vec![code], "{:#?}", f.problems);
    f.problems[0].message.clone()
}

fn data_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(sub)
}

// ---- §1 the envelope ---------------------------------------------------------------------------

#[test]
fn r1_xmlns_is_the_root_namespace() {
    let f = ok(&form(""));
    assert_eq!(f.xmlns, FORM_NS);
    let f = ok("<data><x/></data>");
    assert_eq!(f.xmlns, "", "a root without namespace has an empty xmlns");
    let f = ok(r#"<p:data xmlns:p="urn:prefixed"/>"#);
    assert_eq!(f.xmlns, "urn:prefixed");
}

#[test]
fn r2_meta_fields_are_read_trimmed() {
    let xml = format!(
        "<data xmlns=\"{FORM_NS}\"><q>1</q><n1:meta xmlns:n1=\"{JR}\">\
         <n1:instanceID>  f-42 \n</n1:instanceID><n1:userID>u-1</n1:userID>\
         <n1:username> maria </n1:username><n1:timeEnd>2026-03-02T09:15:22Z</n1:timeEnd>\
         </n1:meta></data>"
    );
    let f = ok(&xml);
    assert_eq!(f.instance_id.as_str(), "f-42");
    assert_eq!(f.user_id.as_deref(), Some("u-1"));
    assert_eq!(f.username.as_deref(), Some("maria"));
    assert_eq!(f.time_end.as_deref(), Some("2026-03-02T09:15:22Z"));
}

#[test]
fn r2_empty_meta_values_are_none() {
    let xml = format!(
        "<data xmlns=\"{FORM_NS}\"><n1:meta xmlns:n1=\"{JR}\"><n1:instanceID>i</n1:instanceID>\
         <n1:userID>  </n1:userID><n1:username/><n1:timeEnd></n1:timeEnd></n1:meta></data>"
    );
    let f = ok(&xml);
    assert_eq!((f.user_id, f.username, f.time_end), (None, None, None));
}

#[test]
fn r2_meta_must_be_a_root_child_in_the_jr_namespace() {
    // Wrong namespace: ignored.
    let xml = format!(
        "<data xmlns=\"{FORM_NS}\"><meta><userID>u-x</userID><instanceID>i-x</instanceID></meta></data>"
    );
    let f = ok(&xml);
    assert_eq!(f.user_id, None);
    assert!(f.instance_id.as_str().starts_with("sha256:"));
    // Right namespace, but nested in a group: not the form's meta.
    let xml = format!(
        "<data xmlns=\"{FORM_NS}\"><g><m:meta xmlns:m=\"{JR}\"><m:userID>u-x</m:userID></m:meta></g></data>"
    );
    assert_eq!(ok(&xml).user_id, None);
    // Default-namespace meta (unprefixed) counts.
    let xml = format!("<data><meta xmlns=\"{JR}\"><userID>u-y</userID></meta></data>");
    assert_eq!(ok(&xml).user_id.as_deref(), Some("u-y"));
}

#[test]
fn r2_nested_collected_text_stays_apart() {
    // Hostile nesting: a v1-looking `case` inside instanceID. Each keeps its own text.
    let xml = format!(
        "<data><n1:meta xmlns:n1=\"{JR}\"><n1:instanceID>a<case><case_id>c-x</case_id></case>b\
         </n1:instanceID></n1:meta></data>"
    );
    let f = ok(&xml);
    assert_eq!(f.instance_id.as_str(), "ab");
    assert!(only_problem(&f, ErrorCode::UnsupportedCaseVersion).contains("\"c-x\""));
}

#[test]
fn r3_missing_instance_id_is_the_sha256_of_the_bytes() {
    let xml = format!("<data xmlns=\"{FORM_NS}\">{}</data>", block("c-1", CREATE));
    let f = ok(&xml);
    let hex: String = content_hash(xml.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(f.instance_id.as_str(), format!("sha256:{hex}"));
    // An empty instanceID is no id either.
    let xml2 = format!(
        "<data><n1:meta xmlns:n1=\"{JR}\"><n1:instanceID> </n1:instanceID></n1:meta></data>"
    );
    assert!(ok(&xml2).instance_id.as_str().starts_with("sha256:"));
}

#[test]
fn content_hash_is_sha256() {
    // SHA-256("abc"), FIPS 180-2 appendix B.1.
    let h = content_hash(b"abc");
    assert_eq!(h[..4], [0xba, 0x78, 0x16, 0xbf]);
    assert_eq!(h[28..], [0xf2, 0x00, 0x15, 0xad]);
}

#[test]
fn r4_device_report_has_no_blocks() {
    let xml = format!(
        "<device_report xmlns=\"http://code.javarosa.org/devicereport\"><device_id>d</device_id>{}\
         </device_report>",
        block("c-1", CREATE)
    );
    let f = ok(&xml);
    assert!(f.device_report);
    assert!(f.blocks.is_empty() && f.problems.is_empty());
    assert!(!ok(&form("")).device_report);
}

// ---- §2 finding blocks -----------------------------------------------------------------------

#[test]
fn r7_blocks_in_groups_and_repeats_are_found_in_document_order() {
    let xml = form(&format!(
        "<household>{}</household><children><child>{}</child><child>{}</child></children>{}",
        block("c-mother", "<n0:update><n0:a>1</n0:a></n0:update>"),
        block("c-a", CREATE),
        block("c-b", CREATE),
        block("c-top", "<n0:close/>"),
    ));
    let f = ok(&xml);
    let ids: Vec<&str> = f.blocks.iter().map(|b| b.case_id.as_str()).collect();
    assert_eq!(ids, ["c-mother", "c-a", "c-b", "c-top"]);
    assert!(f.problems.is_empty());
}

#[test]
fn r7_no_blocks_inside_blocks() {
    let inner = block("c-inner", CREATE);
    let xml = form(&block(
        "c-outer",
        &format!("<n0:update><n0:x>1</n0:x></n0:update>{inner}"),
    ));
    let f = ok(&xml);
    assert_eq!(f.blocks.len(), 1);
    assert_eq!(f.blocks[0].case_id.as_str(), "c-outer");
}

#[test]
fn r7_case_element_without_case_id_is_ordinary_data() {
    let xml = form(&format!(
        "<case>just a question</case><case><name>x</name>{}</case>",
        block("c-1", CREATE)
    ));
    let f = ok(&xml);
    assert_eq!(
        f.blocks.len(),
        1,
        "blocks below a plain `case` are still found"
    );
    assert!(f.problems.is_empty());
}

#[test]
fn r7_root_is_never_a_block() {
    let f = ok(&format!("<n0:case xmlns:n0=\"{V2}\" case_id=\"c-root\"/>"));
    assert!(f.blocks.is_empty() && f.problems.is_empty());
}

#[test]
fn r7_r8_case_id_child_makes_a_v1_block_and_drops_what_was_inside() {
    let xml = form(&format!(
        "<case xmlns=\"http://commcarehq.org/case/transaction/v1\">{}<case_id> c-v1 </case_id></case>",
        block("c-hidden", CREATE)
    ));
    let f = ok(&xml);
    assert!(f.blocks.is_empty(), "the v2 block sat inside a (v1) block");
    let msg = only_problem(&f, ErrorCode::UnsupportedCaseVersion);
    assert!(msg.contains("\"c-v1\"") && msg.contains("v1"), "{msg}");
}

#[test]
fn r8_v1_namespace_is_unsupported() {
    let xml = form(
        "<case xmlns=\"http://commcarehq.org/case/transaction/v1\"><case_id>c-v1-client</case_id>\
         <create><case_type_id>pregnancy</case_type_id></create></case>",
    );
    let f = ok(&xml);
    assert!(f.blocks.is_empty());
    only_problem(&f, ErrorCode::UnsupportedCaseVersion);
}

#[test]
fn r8_v1_with_case_id_attribute_and_unknown_namespaces_are_unsupported() {
    for ns in [
        "xmlns=\"http://commcarehq.org/case/transaction/v1\"",
        "xmlns=\"urn:something-else\"",
        "", // the form's own default namespace
    ] {
        let xml = form(&format!(
            "<case {ns} case_id=\"c-1\"><update><x>1</x></update></case>"
        ));
        let f = ok(&xml);
        assert!(f.blocks.is_empty());
        let msg = only_problem(&f, ErrorCode::UnsupportedCaseVersion);
        assert!(msg.contains("\"c-1\""), "{msg}");
    }
    // Truly no namespace at all.
    let f = ok("<data><case case_id=\"c-2\"/></data>");
    let msg = only_problem(&f, ErrorCode::UnsupportedCaseVersion);
    assert!(msg.contains("no namespace"), "{msg}");
}

#[test]
fn r8_unsupported_block_keeps_the_rest_of_the_form() {
    let xml = form(&format!(
        "{}<case case_id=\"c-old\"/>{}",
        block("c-1", CREATE),
        block("c-2", "<n0:close/>")
    ));
    let f = ok(&xml);
    assert_eq!(f.blocks.len(), 2);
    assert_eq!(codes(&f), [ErrorCode::UnsupportedCaseVersion]);
}

#[test]
fn r8_children_in_another_namespace_are_read_by_local_name() {
    let xml = form(&format!(
        "<n0:case xmlns:n0=\"{V2}\" case_id=\"c-1\"><create><case_name>M</case_name>\
         <x:case_type xmlns:x=\"urn:x\">t</x:case_type></create><update><edd>1</edd></update></n0:case>"
    ));
    let f = ok(&xml);
    let c = f.blocks[0].actions.create.as_ref().unwrap();
    assert_eq!((c.case_name.as_str(), c.case_type.as_str()), ("M", "t"));
    assert_eq!(f.blocks[0].actions.update, [("edd".into(), "1".into())]);
}

#[test]
fn r8_v2_namespace_with_only_a_case_id_child_is_an_illegal_case_id() {
    let xml = form(&format!(
        "<n0:case xmlns:n0=\"{V2}\"><n0:case_id>c-1</n0:case_id>{CREATE}</n0:case>"
    ));
    let f = ok(&xml);
    assert!(f.blocks.is_empty());
    let msg = only_problem(&f, ErrorCode::IllegalCaseId);
    assert!(msg.contains("no case_id attribute"), "{msg}");
}

#[test]
fn r9_block_attributes() {
    let f = ok(&form(&block_with(
        "case_id=\"  c-1 \" date_modified=\"2026-03-02T09:15:22.104+03:00\" user_id=\"u-9\"",
        "",
    )));
    let b = &f.blocks[0];
    assert_eq!(b.case_id.as_str(), "c-1");
    assert_eq!(
        b.date_modified.unwrap().to_string(),
        "2026-03-02T06:15:22.104Z"
    );
    assert_eq!(b.user_id.as_deref(), Some("u-9"));
    assert!(f.problems.is_empty());
}

#[test]
fn r9_absent_or_empty_date_and_user_are_none() {
    let f = ok(&form(&block_with("case_id=\"c-1\"", "")));
    assert_eq!(
        (f.blocks[0].date_modified, f.blocks[0].user_id.clone()),
        (None, None)
    );
    let f = ok(&form(&block_with(
        "case_id=\"c-1\" date_modified=\"\" user_id=\" \"",
        "",
    )));
    assert_eq!(
        (f.blocks[0].date_modified, f.blocks[0].user_id.clone()),
        (None, None)
    );
    assert!(f.problems.is_empty());
}

#[test]
fn r9_empty_or_blank_case_id_is_illegal() {
    let f = ok(&form(&block("", CREATE)));
    let msg = only_problem(&f, ErrorCode::IllegalCaseId);
    assert!(
        msg.contains("case_id is empty") && msg.contains("<n0:case>"),
        "{msg}"
    );
    let f = ok(&form(&block(" \t ", CREATE)));
    assert!(only_problem(&f, ErrorCode::IllegalCaseId).contains("whitespace-only"));
}

#[test]
fn r9_r50_case_id_over_255_characters_is_illegal() {
    let long = "é".repeat(256);
    let f = ok(&form(&block(&long, "")));
    assert!(only_problem(&f, ErrorCode::IllegalCaseId).contains("256 characters"));
    // Exactly 255 characters (510 bytes) is fine.
    assert!(ok(&form(&block(&"é".repeat(255), ""))).problems.is_empty());
}

#[test]
fn r9_r76_unparseable_date_modified_is_a_phone_date_value_error() {
    let f = ok(&form(&block_with(
        "case_id=\"abc\" date_modified=\"2015-08-06T14:33:12.077 05:30\"",
        "",
    )));
    let msg = only_problem(&f, ErrorCode::PhoneDateValueError);
    assert_eq!(
        msg,
        "case \"abc\": date_modified \"2015-08-06T14:33:12.077 05:30\" on <n0:case> is not an \
         ISO 8601 datetime"
    );
    assert_eq!(f.blocks[0].date_modified, None);
}

#[test]
fn r76_accepted_date_shapes() {
    for (text, want) in [
        ("2026-03-02T09:15:22.104+03:00", "2026-03-02T06:15:22.104Z"),
        ("2026-03-02T09:15:00Z", "2026-03-02T09:15:00.000Z"),
        ("2026-03-02", "2026-03-02T00:00:00.000Z"),
        ("2026-03-03T09:15:00.250+0530", "2026-03-03T03:45:00.250Z"),
    ] {
        let f = ok(&form(&block_with(
            &format!("case_id=\"c\" date_modified=\"{text}\""),
            "",
        )));
        assert_eq!(
            f.blocks[0].date_modified.unwrap().to_string(),
            want,
            "{text}"
        );
    }
}

// ---- §3 actions --------------------------------------------------------------------------------

#[test]
fn r10_block_without_actions_is_a_noop_touch() {
    let f = ok(&form(&block("c-1", "<n0:note>ignored</n0:note>")));
    assert_eq!(f.blocks[0].actions, domain::Actions::default());
    assert!(f.problems.is_empty());
    // Self-closing block too.
    let f = ok(&form(&format!(
        "<n0:case xmlns:n0=\"{V2}\" case_id=\"c-2\"/>"
    )));
    assert_eq!(f.blocks.len(), 1);
}

#[test]
fn r10_r11_actions_are_collected_regardless_of_document_order() {
    let inner = "<n0:attachment><n0:photo src=\"p.jpg\" from=\"local\"/></n0:attachment>\
                 <n0:index><n0:parent case_type=\"mother\">c-0</n0:parent></n0:index>\
                 <n0:close/>\
                 <n0:update><n0:x>1</n0:x></n0:update>\
                 <n0:unknown><n0:y>2</n0:y></n0:unknown>"
        .to_owned()
        + CREATE;
    let f = ok(&form(&block("c-1", &inner)));
    let a = &f.blocks[0].actions;
    assert!(a.create.is_some() && a.close);
    assert_eq!(a.update, [("x".into(), "1".into())]);
    assert_eq!(a.index.len(), 1);
    assert_eq!(a.attachment.len(), 1);
    assert_eq!(a.order_key(), 0);
    assert!(f.problems.is_empty());
}

#[test]
fn r50_referral_anywhere_in_a_block_uses_referrals() {
    let f = ok(&form(&block(
        "c-1",
        "<n0:update><n0:referred>yes</n0:referred></n0:update>\
         <n0:referral><n0:referral_id>r-77</n0:referral_id></n0:referral>",
    )));
    let msg = only_problem(&f, ErrorCode::UsesReferrals);
    assert!(msg.contains("c-1") && msg.contains("n0:referral"), "{msg}");
    // Nested deeper, and twice: still one problem per block.
    let f = ok(&form(&block(
        "c-2",
        "<n0:x><n0:referral/></n0:x><n0:referral/>",
    )));
    assert_eq!(codes(&f), [ErrorCode::UsesReferrals]);
    // A `referral` question outside blocks is just data.
    assert!(ok(&form("<referral>yes</referral>")).problems.is_empty());
}

#[test]
fn r14_create_fields() {
    let f = ok(&form(&block(
        "c-1",
        "<n0:create><n0:case_type> pregnancy </n0:case_type><n0:case_name>Monica A</n0:case_name>\
         <n0:owner_id>g-team</n0:owner_id><n0:external_id>EXT-1</n0:external_id>\
         <n0:date_opened>2026-01-15</n0:date_opened><n0:user_id>ignored</n0:user_id></n0:create>",
    )));
    let c = f.blocks[0].actions.create.clone().unwrap();
    assert_eq!(c.case_type, "pregnancy");
    assert_eq!(c.case_name, "Monica A");
    assert_eq!(c.owner_id.as_deref(), Some("g-team"));
    assert_eq!(c.external_id.as_deref(), Some("EXT-1"));
    assert_eq!(
        c.date_opened.unwrap().to_string(),
        "2026-01-15T00:00:00.000Z"
    );
    assert!(f.problems.is_empty());
}

#[test]
fn r14_r38_blank_owner_id_is_none() {
    for owner in ["<n0:owner_id/>", "<n0:owner_id>  </n0:owner_id>", ""] {
        let f = ok(&form(&block(
            "c-1",
            &format!(
                "<n0:create><n0:case_type>t</n0:case_type><n0:case_name>n</n0:case_name>{owner}</n0:create>"
            ),
        )));
        assert_eq!(
            f.blocks[0].actions.create.as_ref().unwrap().owner_id,
            None,
            "{owner}"
        );
    }
}

#[test]
fn r14_unparseable_create_date_opened_is_a_case_value_error() {
    let f = ok(&form(&block(
        "c-1",
        "<n0:create><n0:case_type>t</n0:case_type><n0:case_name>n</n0:case_name>\
         <n0:date_opened>yesterday</n0:date_opened></n0:create>",
    )));
    let msg = only_problem(&f, ErrorCode::CaseValueError);
    assert!(
        msg.contains("<n0:date_opened>") && msg.contains("\"yesterday\""),
        "{msg}"
    );
    assert_eq!(
        f.blocks[0].actions.create.as_ref().unwrap().date_opened,
        None
    );
}

#[test]
fn r51_create_without_case_type_or_case_name_is_a_case_value_error() {
    let f = ok(&form(&block(
        "c-1",
        "<n0:create><n0:case_name>n</n0:case_name></n0:create>",
    )));
    assert!(only_problem(&f, ErrorCode::CaseValueError).contains("<case_type>"));
    let f = ok(&form(&block("c-1", "<n0:create/>")));
    let msg = only_problem(&f, ErrorCode::CaseValueError);
    assert!(
        msg.contains("case_type") && msg.contains("case_name"),
        "{msg}"
    );
    // Present but empty elements satisfy R51.
    let f = ok(&form(&block(
        "c-1",
        "<n0:create><n0:case_type/><n0:case_name></n0:case_name></n0:create>",
    )));
    assert!(f.problems.is_empty());
}

#[test]
fn r50_create_values_over_255_characters_are_case_value_errors() {
    let long = "a".repeat(256);
    for field in ["case_name", "case_type", "owner_id", "external_id"] {
        let mut parts = vec![("case_type", "t".to_owned()), ("case_name", "n".to_owned())];
        parts.retain(|(n, _)| *n != field);
        parts.push((field, long.clone()));
        let inner: String = parts
            .iter()
            .map(|(n, v)| format!("<n0:{n}>{v}</n0:{n}>"))
            .collect();
        let f = ok(&form(&block(
            "c-1",
            &format!("<n0:create>{inner}</n0:create>"),
        )));
        let msg = only_problem(&f, ErrorCode::CaseValueError);
        assert!(
            msg.contains(&format!("<n0:{field}> is 256 characters")),
            "{msg}"
        );
    }
    // 255 is fine.
    let ok255 = format!(
        "<n0:create><n0:case_type>t</n0:case_type><n0:case_name>{}</n0:case_name></n0:create>",
        "a".repeat(255)
    );
    assert!(ok(&form(&block("c-1", &ok255))).problems.is_empty());
}

#[test]
fn r17_update_values_are_trimmed_and_empty_is_empty_string() {
    let f = ok(&form(&block(
        "c-1",
        "<n0:update><n0:edd>  2026-09-01\n </n0:edd><n0:note/><n0:blank>   </n0:blank>\
         <n0:multi>line one\r\nline two</n0:multi></n0:update>",
    )));
    assert_eq!(
        f.blocks[0].actions.update,
        [
            ("edd".into(), "2026-09-01".into()),
            ("note".into(), String::new()),
            ("blank".into(), String::new()),
            ("multi".into(), "line one\nline two".into()),
        ]
    );
}

#[test]
fn r17_text_handles_cdata_entities_and_char_refs() {
    let f = ok(&form(&block(
        "c-1",
        "<n0:update><n0:a><![CDATA[<b>&amp;</b>]]></n0:a><n0:b>&lt;&gt;&amp;&apos;&quot;</n0:b>\
         <n0:c>&#65;&#x42;&#x1F600;</n0:c><n0:d> x <!-- note --> y </n0:d></n0:update>",
    )));
    let u = &f.blocks[0].actions.update;
    assert_eq!(u[0], ("a".into(), "<b>&amp;</b>".into()));
    assert_eq!(u[1], ("b".into(), "<>&'\"".into()));
    assert_eq!(u[2], ("c".into(), "AB\u{1F600}".into()));
    assert_eq!(u[3], ("d".into(), "x  y".into()));
}

#[test]
fn r17_property_with_element_children_is_a_case_value_error() {
    let f = ok(&form(&block(
        "abc",
        "<n0:update><n0:address>x<n0:street>Main</n0:street></n0:address></n0:update>",
    )));
    let msg = only_problem(&f, ErrorCode::CaseValueError);
    assert_eq!(
        msg,
        "case \"abc\": <n0:address> contains elements; a case value must be text"
    );
}

#[test]
fn r18_reserved_names_stay_in_the_update_list() {
    let f = ok(&form(&block(
        "c-1",
        "<n0:update><n0:case_name>New</n0:case_name><n0:owner_id>g-2</n0:owner_id>\
         <n0:external_id>E</n0:external_id><n0:date_opened>2026-01-15</n0:date_opened>\
         <n0:closed>false</n0:closed></n0:update>",
    )));
    let names: Vec<&str> = f.blocks[0]
        .actions
        .update
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "case_name",
            "owner_id",
            "external_id",
            "date_opened",
            "closed"
        ]
    );
    assert!(f.problems.is_empty());
}

#[test]
fn r18_r50_reserved_update_values_are_checked() {
    let long = "x".repeat(300);
    for name in ["case_name", "case_type", "owner_id", "external_id"] {
        let f = ok(&form(&block(
            "c-1",
            &format!("<n0:update><n0:{name}>{long}</n0:{name}></n0:update>"),
        )));
        assert!(only_problem(&f, ErrorCode::CaseValueError).contains("300 characters"));
    }
    // Dynamic properties have no length limit (R77: stored verbatim).
    assert!(ok(&form(&block(
        "c-1",
        &format!("<n0:update><n0:note>{long}</n0:note></n0:update>")
    )))
    .problems
    .is_empty());
    let f = ok(&form(&block(
        "c-1",
        "<n0:update><n0:date_opened>15/01/2026</n0:date_opened></n0:update>",
    )));
    only_problem(&f, ErrorCode::CaseValueError);
    // An empty date_opened is not an error (apply_block leaves opened_on alone).
    assert!(ok(&form(&block(
        "c-1",
        "<n0:update><n0:date_opened/></n0:update>"
    )))
    .problems
    .is_empty());
}

#[test]
fn r20_duplicate_properties_are_kept_in_document_order() {
    let f = ok(&form(&block(
        "c-1",
        "<n0:update><n0:edd>1</n0:edd><n0:lmp>x</n0:lmp><n0:edd>2</n0:edd></n0:update>\
         <n0:update><n0:edd>3</n0:edd></n0:update>",
    )));
    let values: Vec<(&str, &str)> = f.blocks[0]
        .actions
        .update
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        values,
        [("edd", "1"), ("lmp", "x"), ("edd", "2"), ("edd", "3")]
    );
}

#[test]
fn r80_only_the_last_value_of_a_repeated_property_or_index_is_validated() {
    let long = "N".repeat(300);
    // Earlier values with problems, replaced later in the block (across two <update> and two
    // <index> elements): no problem.
    let f = ok(&form(&block(
        "c-1",
        &format!(
            "<n0:update><n0:case_name>{long}</n0:case_name><n0:date_opened>soon</n0:date_opened>\
             <n0:edd><x/></n0:edd></n0:update>\
             <n0:index><n0:mother>c-0</n0:mother></n0:index>\
             <n0:index><n0:host relationship=\"sibling\">c-0</n0:host></n0:index>\
             <n0:update><n0:case_name>Baby</n0:case_name><n0:date_opened>2026-03-05</n0:date_opened>\
             <n0:edd>1</n0:edd></n0:update>\
             <n0:index><n0:mother case_type=\"pregnancy\">c-2</n0:mother>\
             <n0:host case_type=\"pregnancy\" relationship=\"extension\">c-2</n0:host></n0:index>"
        ),
    )));
    assert!(f.problems.is_empty(), "{:#?}", f.problems);
    let ix = &f.blocks[0].actions.index;
    assert_eq!(ix.len(), 4);
    assert_eq!(
        (ix[2].identifier.as_str(), ix[2].case_type.as_str()),
        ("mother", "pregnancy")
    );
    // A last value with a problem is still refused, whatever came before it.
    let f = ok(&form(&block(
        "c-1",
        "<n0:index><n0:mother case_type=\"pregnancy\">c-2</n0:mother></n0:index>\
         <n0:index><n0:mother>c-2</n0:mother></n0:index>\
         <n0:update><n0:case_name>Baby</n0:case_name><n0:case_name><x/></n0:case_name></n0:update>",
    )));
    assert_eq!(
        codes(&f),
        vec![ErrorCode::InvalidCaseIndex, ErrorCode::CaseValueError],
        "{:#?}",
        f.problems
    );
    // The same identifier in two blocks is two values, each validated.
    let f = ok(&form(&format!(
        "{}{}",
        block("c-1", "<n0:index><n0:mother>c-2</n0:mother></n0:index>"),
        block(
            "c-1",
            "<n0:index><n0:mother case_type=\"pregnancy\">c-2</n0:mother></n0:index>"
        ),
    )));
    assert_eq!(codes(&f), vec![ErrorCode::InvalidCaseIndex]);
}

#[test]
fn r21_close() {
    let f = ok(&form(&block("c-1", "<n0:close/>")));
    assert!(f.blocks[0].actions.close);
    assert!(f.blocks[0].actions.is_close_only());
    let f = ok(&form(&block("c-1", "<n0:close>anything</n0:close>")));
    assert!(f.blocks[0].actions.close);
    assert!(!ok(&form(&block("c-1", ""))).blocks[0].actions.close);
}

#[test]
fn r25_r27_index_children() {
    let f = ok(&form(&block(
        "c-1",
        "<n0:index><n0:parent case_type=\"pregnancy\"> c-mother </n0:parent>\
         <n0:host case_type=\"household\" relationship=\"extension\">c-hh</n0:host>\
         <n0:other case_type=\"x\" relationship=\"\">c-o</n0:other></n0:index>",
    )));
    let ix = &f.blocks[0].actions.index;
    assert_eq!(ix.len(), 3);
    assert_eq!(
        (
            ix[0].identifier.as_str(),
            ix[0].case_id.as_str(),
            ix[0].case_type.as_str()
        ),
        ("parent", "c-mother", "pregnancy")
    );
    assert_eq!(ix[0].relationship, Relationship::Child);
    assert_eq!(ix[1].relationship, Relationship::Extension);
    assert_eq!(
        ix[2].relationship,
        Relationship::Child,
        "R27: empty means child"
    );
    assert!(f.problems.is_empty());
}

#[test]
fn r26_index_without_case_type_is_invalid() {
    let f = ok(&form(&block(
        "c-untyped-child",
        "<n0:index><n0:parent>3f9b</n0:parent></n0:index>",
    )));
    let msg = only_problem(&f, ErrorCode::InvalidCaseIndex);
    assert_eq!(
        msg,
        "case \"c-untyped-child\": index <n0:parent> has no case_type attribute"
    );
}

#[test]
fn r26_r28_index_deletion_still_needs_case_type() {
    // R28: an empty value deletes the index.
    let f = ok(&form(&block(
        "c-kid",
        "<n0:index><n0:parent case_type=\"pregnancy\"/></n0:index>",
    )));
    assert_eq!(f.blocks[0].actions.index[0].case_id, "");
    assert!(f.problems.is_empty());
    // R26 holds for deletions too, as in HQ.
    let f = ok(&form(&block("c-kid", "<n0:index><n0:parent/></n0:index>")));
    only_problem(&f, ErrorCode::InvalidCaseIndex);
}

#[test]
fn r27_unknown_relationship_is_invalid() {
    let f = ok(&form(&block(
        "c-1",
        "<n0:index><n0:host case_type=\"h\" relationship=\"sibling\">c-0</n0:host></n0:index>",
    )));
    assert!(only_problem(&f, ErrorCode::InvalidCaseIndex).contains("\"sibling\""));
}

#[test]
fn r25_index_value_with_elements_is_invalid() {
    let f = ok(&form(&block(
        "c-1",
        "<n0:index><n0:parent case_type=\"p\"><n0:id>c-0</n0:id></n0:parent></n0:index>",
    )));
    only_problem(&f, ErrorCode::InvalidCaseIndex);
}

#[test]
fn r31_attachment_children() {
    let f = ok(&form(&block(
        "c-1",
        "<n0:attachment><n0:mother_photo src=\"1.jpg\" from=\"local\"/>\
         <n0:consent_scan src=\"2.jpg\" from=\"remote\" name=\"consent.jpg\"/>\
         <n0:old_photo/><n0:blank src=\"\"/></n0:attachment>",
    )));
    let at = &f.blocks[0].actions.attachment;
    let got: Vec<_> = at
        .iter()
        .map(|a| {
            (
                a.identifier.as_str(),
                a.src.as_deref(),
                a.from.as_deref(),
                a.name.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("mother_photo", Some("1.jpg"), Some("local"), None),
            (
                "consent_scan",
                Some("2.jpg"),
                Some("remote"),
                Some("consent.jpg")
            ),
            ("old_photo", None, None, None),
            ("blank", None, None, None),
        ]
    );
}

#[test]
fn r49_problems_are_in_document_order_and_the_form_still_parses() {
    let f = ok(&form(&format!(
        "{}{}{}",
        block_with("case_id=\"c-1\" date_modified=\"bad\"", ""),
        block("", ""),
        block("c-3", "<n0:index><n0:p>x</n0:p></n0:index>"),
    )));
    assert_eq!(
        codes(&f),
        [
            ErrorCode::PhoneDateValueError,
            ErrorCode::IllegalCaseId,
            ErrorCode::InvalidCaseIndex
        ]
    );
    assert_eq!(f.blocks.len(), 3);
}

#[test]
fn problems_are_capped_per_code() {
    let props: String = (0..100)
        .map(|i| format!("<n0:p{i}><x/></n0:p{i}>"))
        .collect();
    let f = ok(&form(&format!(
        "{}{}",
        block("c-1", &format!("<n0:update>{props}</n0:update>")),
        block_with("case_id=\"c-2\" date_modified=\"bad\"", "")
    )));
    let case_value = codes(&f)
        .iter()
        .filter(|c| **c == ErrorCode::CaseValueError)
        .count();
    assert_eq!(case_value, 32);
    assert!(
        codes(&f).contains(&ErrorCode::PhoneDateValueError),
        "other codes still recorded"
    );
}

#[test]
fn problem_messages_shorten_huge_values_ids_and_names() {
    let f = ok(&form(&block_with(
        &format!("case_id=\"c-1\" date_modified=\"{}\"", "9".repeat(100_000)),
        "",
    )));
    assert!(
        f.problems[0].message.len() < 300,
        "{}",
        f.problems[0].message
    );
    // A huge case id is repeated in every message about its block: shortened each time.
    let long_id = "i".repeat(500_000);
    let long_name = "p".repeat(500_000);
    let props: String = (0..40)
        .map(|i| format!("<n0:q{i}><x/></n0:q{i}>"))
        .collect();
    let f = ok(&form(&block(
        &long_id,
        &format!(
            "<n0:update>{props}<n0:{long_name}><x/></n0:{long_name}></n0:update>\
             <n0:{long_name}><n0:referral/></n0:{long_name}>"
        ),
    )));
    let total: usize = f.problems.iter().map(|p| p.message.len()).sum();
    assert!(
        total < 32 * 1024,
        "{} problems, {total} bytes",
        f.problems.len()
    );
    let f = ok(&form(&format!(
        "<c:case xmlns:c=\"urn:{long_name}\" case_id=\"{long_id}\"/>"
    )));
    assert!(only_problem(&f, ErrorCode::UnsupportedCaseVersion).len() < 1024);
}

// ---- real forms ------------------------------------------------------------------------------

const REGISTER: &str = include_str!("../tests/data/conformance/01-shared-team/01-register.xml");
const HOUSEHOLD_VISIT: &str =
    include_str!("../tests/data/conformance/25-multiple-blocks-one-form/03-household-visit.xml");

#[test]
fn conformance_register_form() {
    let f = ok(REGISTER);
    assert_eq!(
        f.instance_id.as_str(),
        "3d307d25-cc07-51c3-bfcb-fcd7d6a6807c"
    );
    assert_eq!(f.xmlns, FORM_NS);
    assert_eq!(f.user_id.as_deref(), Some("u-david"));
    assert_eq!(f.username.as_deref(), Some("david"));
    assert_eq!(f.time_end.as_deref(), Some("2026-03-02T09:15:22.104+03:00"));
    assert_eq!(f.blocks.len(), 1);
    let b = &f.blocks[0];
    assert_eq!(b.case_id.as_str(), "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10");
    assert_eq!(
        b.date_modified,
        Timestamp::parse_phone("2026-03-02T06:15:22.104Z").ok()
    );
    let c = b.actions.create.as_ref().unwrap();
    assert_eq!(
        (
            c.case_name.as_str(),
            c.case_type.as_str(),
            c.owner_id.as_deref()
        ),
        ("Monica Achieng", "pregnancy", None)
    );
    assert_eq!(
        b.actions.update,
        [
            ("edd".into(), "2026-09-01".into()),
            ("lmp".into(), "2025-11-25".into())
        ]
    );
    assert!(f.problems.is_empty());
}

#[test]
fn conformance_household_visit_has_blocks_in_repeats() {
    let f = ok(HOUSEHOLD_VISIT);
    let ids: Vec<&str> = f.blocks.iter().map(|b| b.case_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10",
            "c-child-a",
            "c-child-b",
            "c-old-referral"
        ]
    );
    assert!(f.blocks[3].actions.close);
    assert_eq!(f.blocks[1].actions.index[0].case_type, "pregnancy");
}

/// Every conformance form parses, and the ones whose scenario expects a parse-level rejection
/// carry that problem (or, for 23, an `XmlError`).
#[test]
fn conformance_forms_parse() {
    let expected_problem = |name: &str| match name {
        "21-illegal-case-id/01-empty-id.xml" | "21-illegal-case-id/02-blank-id.xml" => {
            Some(ErrorCode::IllegalCaseId)
        }
        "22-v1-namespace/01-v1.xml" => Some(ErrorCode::UnsupportedCaseVersion),
        "30-date-formats/05-space-offset.xml" | "30-date-formats/06-us-date.xml" => {
            Some(ErrorCode::PhoneDateValueError)
        }
        "32-index-case-type-required/02-index-no-type.xml" => Some(ErrorCode::InvalidCaseIndex),
        "33-referrals-rejected/02-referral.xml" => Some(ErrorCode::UsesReferrals),
        "34-case-value-error/01-long-name.xml" => Some(ErrorCode::CaseValueError),
        _ => None,
    };
    let root = data_dir("conformance");
    let mut seen = 0;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "xml"))
            .collect();
        files.sort();
        for file in files {
            seen += 1;
            let name = file
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let raw = std::fs::read(&file).unwrap();
            let result = parse(&raw, &Limits::default());
            if name == "23-malformed-xml/01-bad.xml" {
                assert!(
                    matches!(result, Err(XmlError::MismatchedEndTag { ref found, .. }) if found == "n0:updat"),
                    "{name}: {result:?}"
                );
                continue;
            }
            let f = result.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                f.xmlns.starts_with("http://openrosa.org/formdesigner/"),
                "{name}"
            );
            assert!(!f.instance_id.as_str().starts_with("sha256:"), "{name}");
            assert!(f.user_id.is_some(), "{name}");
            match expected_problem(&name) {
                Some(code) => assert_eq!(codes(&f)[..1], [code], "{name}: {:?}", f.problems),
                None => {
                    assert!(f.problems.is_empty(), "{name}: {:?}", f.problems);
                    assert!(!f.blocks.is_empty(), "{name}");
                }
            }
        }
    }
    assert!(seen >= 77, "only {seen} conformance forms found");
}

/// The forms here are a copy; the workspace's `tests/data/conformance` (itself kept in sync with
/// the shared suite) is the reference. Every form here must be byte-identical to its original.
#[test]
fn conformance_copy_matches_the_workspace_suite() {
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/conformance");
    if !reference.is_dir() {
        eprintln!("SKIP: {} not present", reference.display());
        return;
    }
    let root = data_dir("conformance");
    let mut compared = 0;
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&dir).unwrap() {
            let file = file.unwrap().path();
            let rel = file.strip_prefix(&root).unwrap();
            let original = std::fs::read(reference.join(rel))
                .unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
            assert!(
                std::fs::read(&file).unwrap() == original,
                "{} differs",
                rel.display()
            );
            compared += 1;
        }
    }
    assert!(compared >= 77, "{compared}");
}

// ---- R50: not a readable form ----------------------------------------------------------------

#[test]
fn r50_not_well_formed() {
    let good = form(&block("c-1", CREATE));
    assert!(matches!(
        err(good.replace("</n0:create>", "</n0:creat>")),
        XmlError::MismatchedEndTag { .. }
    ));
    assert!(matches!(
        err(&good[..good.len() - 7]),
        XmlError::Truncated { .. }
    ));
    assert!(matches!(
        err(&good[..good.len() - 3]),
        XmlError::Malformed { .. }
    ));
    assert!(matches!(err(""), XmlError::Empty));
    assert!(matches!(err("  <!-- c --> "), XmlError::NoRoot));
    assert!(matches!(
        err(format!("{good}<x/>")),
        XmlError::ContentOutsideRoot {
            found: "an element",
            ..
        }
    ));
    assert!(matches!(
        err(format!("{good} junk")),
        XmlError::ContentOutsideRoot { found: "text", .. }
    ));
    assert!(matches!(
        err(format!("x{good}")),
        XmlError::Malformed { .. } | XmlError::ContentOutsideRoot { .. }
    ));
    assert!(matches!(
        err(format!("{good}&amp;")),
        XmlError::ContentOutsideRoot { .. }
    ));
    assert!(matches!(
        err(format!("{good}<![CDATA[x]]>")),
        XmlError::ContentOutsideRoot { .. }
    ));
    assert!(matches!(
        err("<data>a ]]> b</data>"),
        XmlError::Malformed { .. }
    ));
    ok("<data>a ]] > b &gt; ]]&gt;</data>");
    // Whitespace, comments and processing instructions around the root are fine.
    ok(&format!("{good}\n<!-- trailer -->\n<?pi x?>\n"));
}

#[test]
fn r50_element_and_attribute_names_must_be_names() {
    for bad in [
        "<data>< a/></data>",
        "<data><1a/></data>",
        "<data xmlns:a=\"u\"><a:b:c/></data>",
        "<data><:a/></data>",
        "<data><n0:/></data>",
        "<data><a&b/></data>",
        "<data a&b=\"1\"/>",
        "<data -a=\"1\"/>",
    ] {
        assert!(matches!(err(bad), XmlError::Malformed { .. }), "{bad}");
    }
    ok("<data><_a.b-c9 xml:lang=\"x\"/><\u{e9}l\u{e9}ment/></data>");
}

#[test]
fn r50_truncated_input_names_the_open_element() {
    let e = err("<data><g><n0:case xmlns:n0=\"x\" case_id=\"c\">text");
    assert_eq!(
        e.to_string(),
        "input ended inside /data/g/n0:case: the submission is truncated"
    );
}

#[test]
fn r50_doctype_is_refused_and_entities_never_expand() {
    let laughs = std::fs::read(data_dir("hostile/billion-laughs.xml")).unwrap();
    let start = Instant::now();
    assert!(matches!(err(&laughs), XmlError::Doctype { offset: 22 }));
    assert!(start.elapsed() < Duration::from_millis(100));
    assert!(matches!(
        err("<!DOCTYPE data><data/>"),
        XmlError::Doctype { .. }
    ));
}

#[test]
fn r50_unknown_entities_and_illegal_char_refs() {
    assert!(matches!(
        err("<data><q>a&nbsp;b</q></data>"),
        XmlError::UnknownEntity { ref name, ref path, .. } if name == "nbsp" && path == "/data/q"
    ));
    assert!(matches!(
        err("<data a=\"&foo;\"/>"),
        XmlError::UnknownEntity { .. }
    ));
    for bad in [
        "&#0;",
        "&#x0;",
        "&#1;",
        "&#xFFFE;",
        "&#xD800;",
        "&#x110000;",
        "&#;",
        "&#x;",
        "&#X41;",
        "&#-1;",
        "&#99999999999999999999;",
    ] {
        let xml = format!("<data><q>{bad}</q></data>");
        assert!(
            matches!(err(&xml), XmlError::IllegalCharRef { .. }),
            "{bad}"
        );
        let xml = format!("<data q=\"{bad}\"/>");
        assert!(
            matches!(err(&xml), XmlError::IllegalCharRef { .. }),
            "attr {bad}"
        );
    }
    assert!(matches!(
        err("<data><q>a & b</q></data>"),
        XmlError::Malformed { .. } | XmlError::UnknownEntity { .. }
    ));
    assert!(matches!(
        err("<data q=\"a & b\"/>"),
        XmlError::Malformed { .. } | XmlError::UnknownEntity { .. }
    ));
}

#[test]
fn r50_nul_and_illegal_characters() {
    let e = err(b"<data>\0</data>");
    assert_eq!(
        e,
        XmlError::IllegalChar {
            offset: 6,
            code_point: 0
        }
    );
    assert!(matches!(
        err(b"<data>\x1b</data>"),
        XmlError::IllegalChar {
            code_point: 0x1b,
            ..
        }
    ));
    assert!(matches!(
        err("<data>\u{FFFF}</data>"),
        XmlError::IllegalChar {
            code_point: 0xFFFF,
            ..
        }
    ));
    // Tab, LF, CR and everything from U+0020 up (but U+FFFE/U+FFFF) are fine.
    ok("<data>\t\r\n\u{7f}\u{85}\u{FFFD}\u{10FFFF}</data>");
}

#[test]
fn r50_encodings_other_than_utf8_are_refused_and_say_so() {
    let utf16: Vec<u8> = "\u{FEFF}<data/>"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let e = err(&utf16);
    assert!(e.to_string().contains("UTF-16LE"), "{e}");
    let latin1_declared = b"<?xml version='1.0' encoding='ISO-8859-1'?><data>Kisum\xe9</data>";
    let e = err(latin1_declared);
    assert!(matches!(e, XmlError::UnsupportedEncoding { .. }));
    assert!(e.to_string().contains("ISO-8859-1"), "{e}");
    assert!(matches!(
        err(b"<data>Kisum\xe9</data>"),
        XmlError::InvalidUtf8 { offset: 11 }
    ));
    // UTF-8 spelled in any case, ASCII, and a UTF-8 byte order mark are fine.
    ok("<?xml version=\"1.0\" encoding=\"Utf-8\"?><data/>");
    ok("<?xml version=\"1.0\" encoding=\"US-ASCII\"?><data/>");
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend_from_slice(form("").as_bytes());
    ok(std::str::from_utf8(&bom).unwrap());
    // Offsets count the byte order mark.
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend_from_slice(b"<data>\0</data>");
    assert!(matches!(err(&bom), XmlError::IllegalChar { offset: 9, .. }));
}

#[test]
fn r50_xml_declaration_must_come_first() {
    assert!(matches!(
        err("\n<?xml version='1.0'?><data/>"),
        XmlError::Malformed { .. }
    ));
}

#[test]
fn r50_duplicate_attributes() {
    let e = err("<data><q a=\"1\" b=\"2\" a=\"3\"/></data>");
    assert_eq!(
        e,
        XmlError::DuplicateAttribute {
            offset: 6,
            path: "/data/q".into(),
            name: "a".into()
        }
    );
    // Many attributes: the set-based check still finds the duplicate.
    let attrs: String = (0..100).map(|i| format!(" a{i}=\"\"")).collect();
    assert!(matches!(
        err(format!("<data{attrs} a57=\"x\"/>")),
        XmlError::DuplicateAttribute { ref name, .. } if name == "a57"
    ));
    ok(&format!("<data{attrs}/>"));
}

#[test]
fn r50_undeclared_prefixes() {
    assert!(matches!(
        err("<data><n9:q/></data>"),
        XmlError::UndeclaredPrefix { ref prefix, .. } if prefix == "n9"
    ));
    assert!(matches!(
        err("<data zz:a=\"1\"/>"),
        XmlError::UndeclaredPrefix { .. }
    ));
    ok("<data xml:lang=\"en\"/>");
}

#[test]
fn r50_namespace_declarations_follow_namespaces_in_xml() {
    for bad in [
        "<data xmlns:p=\"\"/>",
        "<data xmlns:xmlns=\"urn:x\"/>",
        "<data xmlns:xml=\"urn:x\"/>",
    ] {
        assert!(matches!(err(bad), XmlError::Malformed { .. }), "{bad}");
    }
    ok("<data xmlns:xml=\"http://www.w3.org/XML/1998/namespace\" xml:lang=\"en\"/>");
    // A prefix may be declared after the attribute that uses it, on the same tag.
    ok("<data a:x=\"1\" xmlns:a=\"urn:a\"/>");
    // Declarations end with their element.
    let xml = format!("<data><g xmlns:n0=\"{V2}\"/><n0:case case_id=\"x\"/></data>");
    assert!(matches!(err(xml), XmlError::UndeclaredPrefix { .. }));
    // An inner declaration shadows an outer one.
    let xml =
        format!("<data xmlns:n0=\"urn:other\"><n0:case xmlns:n0=\"{V2}\" case_id=\"c\"/></data>");
    assert_eq!(ok(&xml).blocks.len(), 1);
    // `xmlns=""` takes the default namespace away (R8: a block in no namespace).
    let f = ok(&format!(
        "<data xmlns=\"{V2}\"><case xmlns=\"\" case_id=\"c\"/></data>"
    ));
    assert!(only_problem(&f, ErrorCode::UnsupportedCaseVersion).contains("no namespace"));
    // Entity references in a namespace name are resolved like any attribute value.
    let f = ok("<data><n0:case xmlns:n0=\"http://commcarehq.org/case/transaction&#x2F;v2\" case_id=\"c\"/></data>");
    assert_eq!(f.blocks.len(), 1);
}

#[test]
fn r50_attribute_values_are_checked_and_normalised() {
    assert!(matches!(
        err("<data a=\"x<y\"/>"),
        XmlError::Malformed { .. }
    ));
    assert!(matches!(err("<data a=x/>"), XmlError::Malformed { .. }));
    let f = ok(&form(&block_with(
        "case_id=\"c&amp;1\" user_id=\"u&#x2D;1\"",
        "",
    )));
    assert_eq!(f.blocks[0].case_id.as_str(), "c&1");
    assert_eq!(f.blocks[0].user_id.as_deref(), Some("u-1"));
    let f = ok(&form(&block_with("case_id=\"c\n1\"", "")));
    assert_eq!(
        f.blocks[0].case_id.as_str(),
        "c 1",
        "XML 1.0 §3.3.3 attribute normalisation"
    );
}

#[test]
fn r50_limits_max_bytes_is_checked_before_parsing() {
    let limits = Limits {
        max_bytes: 10,
        ..Limits::default()
    };
    assert_eq!(
        parse(b"<data>0123456789</data>", &limits),
        Err(XmlError::TooLarge { size: 23, max: 10 })
    );
    // Even garbage is only measured.
    assert!(matches!(
        parse(&[0xFF; 11], &limits),
        Err(XmlError::TooLarge { .. })
    ));
}

#[test]
fn r50_limits_max_depth() {
    let limits = Limits {
        max_depth: 3,
        ..Limits::default()
    };
    assert!(parse(b"<a><b><c/></b></a>", &limits).is_ok());
    assert!(matches!(
        parse(b"<a><b><c><d/></c></b></a>", &limits),
        Err(XmlError::TooDeep { max: 3, ref path, .. }) if path == "/a/b/c/d"
    ));
    // Default: 128 levels fine, 129 not.
    let nest = |n: usize| format!("{}{}", "<g>".repeat(n), "</g>".repeat(n));
    ok(&nest(128));
    assert!(matches!(err(nest(129)), XmlError::TooDeep { max: 128, .. }));
}

#[test]
fn r50_limits_max_blocks() {
    let limits = Limits {
        max_blocks: 2,
        ..Limits::default()
    };
    let two = form(&format!("{}{}", block("a", ""), block("b", "")));
    assert!(parse(two.as_bytes(), &limits).is_ok());
    let three = form(&format!(
        "{}{}<case case_id=\"c\"/>",
        block("a", ""),
        block("b", "")
    ));
    assert!(matches!(
        parse(three.as_bytes(), &limits),
        Err(XmlError::TooManyBlocks { max: 2, .. })
    ));
}

#[test]
fn r50_limits_max_value_bytes() {
    let limits = Limits {
        max_value_bytes: 8,
        ..Limits::default()
    };
    assert!(parse(b"<data><q>12345678</q></data>", &limits).is_ok());
    let e = parse(b"<data><q>1234<!-- c -->56789</q></data>", &limits).unwrap_err();
    assert!(matches!(e, XmlError::ValueTooLarge { max: 8, .. }));
    assert!(e.to_string().starts_with("value too large"), "{e}");
    assert!(matches!(
        parse(b"<data><q><![CDATA[123456789]]></q></data>", &limits),
        Err(XmlError::ValueTooLarge { .. })
    ));
    assert!(matches!(
        parse(b"<data q=\"123456789\"/>", &limits),
        Err(XmlError::ValueTooLarge { .. })
    ));
    // Separate values are measured separately.
    assert!(parse(b"<data><q>12345678</q><r>12345678</r></data>", &limits).is_ok());
}

#[test]
fn limits_defaults_match_the_spec() {
    let l = Limits::default();
    assert_eq!(
        (
            l.max_bytes,
            l.max_depth,
            l.max_blocks,
            l.max_value_bytes,
            l.max_block_elements
        ),
        (16 << 20, 128, 10_000, 1 << 20, 100_000)
    );
}

#[test]
fn r50_millions_of_empty_properties_hit_the_block_element_limit() {
    let mut xml = String::from(
        "<data xmlns=\"http://openrosa.org/formdesigner/X\"><n0:case xmlns:n0=\"http://commcarehq.org/case/transaction/v2\" case_id=\"c\"><n0:update>",
    );
    for _ in 0..2_000_000 {
        xml.push_str("<n0:a/>");
    }
    xml.push_str("</n0:update></n0:case></data>");
    let started = std::time::Instant::now();
    let err = parse(xml.as_bytes(), &Limits::default());
    assert!(
        matches!(
            err,
            Err(XmlError::TooManyBlockElements { max: 100_000, .. })
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn xml_error_display_names_offset_and_path() {
    let e = err(form(&block("c-1", "<n0:update><n0:a>x</n0:b></n0:update>")));
    let msg = e.to_string();
    assert!(msg.starts_with("mismatched end tag at byte "), "{msg}");
    assert!(
        msg.contains("in /data/n0:case/n0:update/n0:a: expected </n0:a>, found </n0:b>"),
        "{msg}"
    );
}

// ---- hostile corpus ---------------------------------------------------------------------------

/// The outcome every hostile input must have: a typed error, or a form with a typed problem.
fn assert_typed(name: &str, result: &Result<ParsedForm, XmlError>) {
    match result {
        Err(e) => assert!(!e.to_string().is_empty(), "{name}"),
        Ok(f) => assert!(
            !f.problems.is_empty(),
            "{name}: parsed without problems: {f:?}"
        ),
    }
}

#[test]
fn hostile_corpus_fails_typed_and_fast() {
    let dir = data_dir("hostile");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 40,
        "hostile corpus went missing: {}",
        files.len()
    );
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let raw = std::fs::read(&file).unwrap();
        let start = Instant::now();
        let result = parse(&raw, &Limits::default());
        let took = start.elapsed();
        assert!(took < Duration::from_secs(1), "{name} took {took:?}");
        assert_typed(&name, &result);
        assert_eq!(
            name.starts_with("problem-"),
            result.is_ok(),
            "{name}: problem-* files are well-formed, the others are not: {result:?}"
        );
    }
}

#[test]
fn hostile_corpus_specific_errors() {
    let check = |name: &str, want: fn(&XmlError) -> bool| {
        let raw = std::fs::read(data_dir("hostile").join(name)).unwrap();
        let e = parse(&raw, &Limits::default()).unwrap_err();
        assert!(want(&e), "{name}: {e:?}");
    };
    check("empty.xml", |e| matches!(e, XmlError::Empty));
    check("utf16le-bom.xml", |e| {
        matches!(e, XmlError::UnsupportedEncoding { .. })
    });
    check("utf16be-no-bom.xml", |e| {
        matches!(e, XmlError::UnsupportedEncoding { .. })
    });
    check("utf32-bom.xml", |e| {
        matches!(e, XmlError::UnsupportedEncoding { .. })
    });
    check("latin1-declared.xml", |e| {
        matches!(e, XmlError::UnsupportedEncoding { .. })
    });
    check("windows1252-declared-ascii-body.xml", |e| {
        matches!(e, XmlError::UnsupportedEncoding { .. })
    });
    check("latin1-undeclared.xml", |e| {
        matches!(e, XmlError::InvalidUtf8 { .. })
    });
    check("billion-laughs.xml", |e| {
        matches!(e, XmlError::Doctype { .. })
    });
    check("xxe-external-entity.xml", |e| {
        matches!(e, XmlError::Doctype { .. })
    });
    check("nul-byte.xml", |e| {
        matches!(e, XmlError::IllegalChar { code_point: 0, .. })
    });
    check("char-ref-nul.xml", |e| {
        matches!(e, XmlError::IllegalCharRef { .. })
    });
    check("char-ref-in-attribute.xml", |e| {
        matches!(e, XmlError::IllegalCharRef { .. })
    });
    check("undeclared-entity-no-dtd.xml", |e| {
        matches!(e, XmlError::UnknownEntity { .. })
    });
    check("duplicate-attributes.xml", |e| {
        matches!(e, XmlError::DuplicateAttribute { .. })
    });
    check("garbage-after-root.xml", |e| {
        matches!(e, XmlError::ContentOutsideRoot { .. })
    });
    check("second-root.xml", |e| {
        matches!(e, XmlError::ContentOutsideRoot { .. })
    });
    check("mismatched-end-tag.xml", |e| {
        matches!(e, XmlError::MismatchedEndTag { .. })
    });
    check("truncated-between-tags.xml", |e| {
        matches!(e, XmlError::Truncated { .. })
    });
    check("undeclared-prefix.xml", |e| {
        matches!(e, XmlError::UndeclaredPrefix { .. })
    });
    check("deep-nesting-200.xml", |e| {
        matches!(e, XmlError::TooDeep { .. })
    });
    check("whitespace-only.xml", |e| matches!(e, XmlError::NoRoot));
}

/// Runs `parse` with a time bound generous enough for an unoptimised build on a busy machine.
fn timed(name: &str, raw: &[u8], limits: &Limits) -> Result<ParsedForm, XmlError> {
    let start = Instant::now();
    let result = parse(raw, limits);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "{name} took {took:?}");
    result
}

#[test]
fn hostile_generated_50_mb_property_value() {
    let value = "A".repeat(50 << 20);
    let xml = form(&block(
        "c-1",
        &format!("<n0:update><n0:blob>{value}</n0:blob></n0:update>"),
    ));
    assert!(matches!(
        timed("50 MB value", xml.as_bytes(), &Limits::default()),
        Err(XmlError::TooLarge { .. })
    ));
    // With the body limit raised, the value limit catches it.
    let limits = Limits {
        max_bytes: 64 << 20,
        ..Limits::default()
    };
    assert!(matches!(
        timed("50 MB value, raised body limit", xml.as_bytes(), &limits),
        Err(XmlError::ValueTooLarge { .. })
    ));
}

#[test]
fn hostile_generated_100k_case_blocks() {
    let blocks: String = (0..100_000)
        .map(|i| format!("<n0:case case_id=\"c-{i}\"/>"))
        .collect();
    let xml = format!("<data xmlns:n0=\"{V2}\">{blocks}</data>");
    assert!(matches!(
        timed("100k blocks", xml.as_bytes(), &Limits::default()),
        Err(XmlError::TooManyBlocks { max: 10_000, .. })
    ));
    // Raised limit: all of them parse, in order.
    let limits = Limits {
        max_blocks: 100_000,
        ..Limits::default()
    };
    let f = timed("100k blocks, raised limit", xml.as_bytes(), &limits).unwrap();
    assert_eq!(f.blocks.len(), 100_000);
    assert_eq!(f.blocks[99_999].case_id.as_str(), "c-99999");
}

#[test]
fn hostile_generated_10k_deep_nesting() {
    let xml = format!(
        "<data>{}{}</data>",
        "<g>".repeat(10_000),
        "</g>".repeat(10_000)
    );
    assert!(matches!(
        timed("10k deep", xml.as_bytes(), &Limits::default()),
        Err(XmlError::TooDeep { .. })
    ));
    // Unclosed, too.
    let xml = format!("<data>{}", "<g>".repeat(10_000));
    assert!(matches!(
        timed("10k deep unclosed", xml.as_bytes(), &Limits::default()),
        Err(XmlError::TooDeep { .. })
    ));
}

#[test]
fn hostile_generated_many_attributes_and_namespaces() {
    // 200 000 distinct attributes on one element: the duplicate check must stay linear.
    let attrs: String = (0..200_000).map(|i| format!(" a{i}=\"\"")).collect();
    let xml = format!("<data{attrs}/>");
    assert!(timed("200k attributes", xml.as_bytes(), &Limits::default()).is_ok());
    // Thousands of namespace declarations, then many elements that must be resolved.
    let decls: String = (0..5_000)
        .map(|i| format!(" xmlns:p{i}=\"urn:{i}\""))
        .collect();
    let xml = format!("<data{decls}>{}</data>", "<x/>".repeat(200_000));
    assert!(matches!(
        timed(
            "5k namespace declarations",
            xml.as_bytes(),
            &Limits::default()
        ),
        Err(XmlError::TooManyNamespaces { .. })
    ));
    // Spread over nesting levels as well.
    let nested: String = (0..100)
        .map(|i| {
            format!(
                "<g{}>",
                (0..5)
                    .map(|j| format!(" xmlns:q{j}=\"urn:{i}\""))
                    .collect::<String>()
            )
        })
        .collect();
    let xml = format!("<data>{nested}");
    assert!(matches!(
        timed(
            "nested namespace declarations",
            xml.as_bytes(),
            &Limits::default()
        ),
        Err(XmlError::TooManyNamespaces { .. })
    ));
}

#[test]
fn hostile_generated_many_properties() {
    let props: String = (0..200_000)
        .map(|i| format!("<n0:p{i}>v</n0:p{i}>"))
        .collect();
    let xml = form(&block("c-1", &format!("<n0:update>{props}</n0:update>")));
    assert!(matches!(
        timed("200k properties", xml.as_bytes(), &Limits::default()),
        Err(XmlError::TooManyBlockElements { max: 100_000, .. })
    ));
    // The limit is a setting: raised, the same form parses, in linear time.
    let roomy = Limits {
        max_block_elements: 300_000,
        ..Limits::default()
    };
    let f = timed("200k properties, raised limit", xml.as_bytes(), &roomy).unwrap();
    assert_eq!(f.blocks[0].actions.update.len(), 200_000);
}

// ---- properties --------------------------------------------------------------------------------

/// Bytes that are likely to matter to an XML reader, for splicing into valid forms.
const TOKENS: &[&str] = &[
    "<",
    ">",
    "&",
    ";",
    "\"",
    "'",
    "/",
    "=",
    ":",
    "</",
    "/>",
    "<!--",
    "-->",
    "<![CDATA[",
    "]]>",
    "<?",
    "?>",
    "&amp;",
    "&#0;",
    "&#x10FFFF;",
    "&lol;",
    "<!DOCTYPE x>",
    "\0",
    "\u{FFFE}",
    " xmlns:n0=\"\"",
    " case_id=\"\"",
    "<n0:case case_id=\"x\">",
    "</n0:case>",
    "<case>",
    "<case_id>",
    "<n0:referral/>",
    "\u{FEFF}",
    "\r\n",
    "é",
];

fn valid_form() -> String {
    form(&format!(
        "<q>1</q>{}<group>{}</group>",
        block(
            "c-1",
            "<n0:create><n0:case_name>A</n0:case_name><n0:case_type>t</n0:case_type>\
             <n0:owner_id>g</n0:owner_id></n0:create><n0:update><n0:p>v</n0:p></n0:update>\
             <n0:index><n0:parent case_type=\"t\">c-0</n0:parent></n0:index>\
             <n0:attachment><n0:a src=\"a.jpg\" from=\"local\"/></n0:attachment><n0:close/>"
        ),
        block("c-2", "<n0:update><n0:q>w</n0:q></n0:update>")
    ))
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Splice(usize, usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(i, t)| Mutation::Splice(i, t)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
    match *m {
        Mutation::Flip(i, b) => {
            if !bytes.is_empty() {
                let i = i % bytes.len();
                bytes[i] = b;
            }
        }
        Mutation::Insert(i, b) => {
            let i = at(i, bytes.len());
            bytes.insert(i, b);
        }
        Mutation::Delete(i) => {
            if !bytes.is_empty() {
                let i = i % bytes.len();
                bytes.remove(i);
            }
        }
        Mutation::Splice(i, t) => {
            let i = at(i, bytes.len());
            let token = TOKENS[t].as_bytes();
            bytes.splice(i..i, token.iter().copied());
        }
        Mutation::Truncate(i) => {
            let i = at(i, bytes.len());
            bytes.truncate(i);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse(&bytes, &Limits::default());
    }

    #[test]
    fn prop_arbitrary_text_never_panics(text in "(<|>|&|;|/|=|\"|[a-z:]|#|x|[0-9]|!|\\[|\\]|\\?|-| |\u{e9})*") {
        let _ = parse(text.as_bytes(), &Limits::default());
        let _ = parse(format!("<data>{text}</data>").as_bytes(), &Limits::default());
    }

    #[test]
    fn prop_mutated_valid_forms_never_panic(mutations in proptest::collection::vec(mutation(), 1..8)) {
        let mut bytes = valid_form().into_bytes();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        match parse(&bytes, &Limits::default()) {
            // Whatever came out must be internally sane.
            Ok(f) => prop_assert!(f.blocks.len() <= 3),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn prop_escaped_property_values_round_trip(value in "\\PC{0,40}") {
        // Any text, escaped as a phone would write it, comes back trimmed (R17).
        prop_assume!(value.chars().all(refs::is_xml_char) && !value.contains('\r'));
        let escaped = value
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        let xml = form(&block("c-1", &format!("<n0:update><n0:p>{escaped}</n0:p></n0:update>")));
        let f = parse(xml.as_bytes(), &Limits::default()).unwrap();
        prop_assert_eq!(&f.blocks[0].actions.update[0].1, value.trim());
    }
}

#[test]
fn the_valid_form_used_by_the_properties_is_valid() {
    let f = ok(&valid_form());
    assert_eq!(f.blocks.len(), 2);
    assert!(f.problems.is_empty());
}

// ---- speed -------------------------------------------------------------------------------------

/// A ~3 KB form with two case blocks, like a registration with a sub-case.
fn speed_form() -> String {
    let questions: String = (0..40)
        .map(|i| format!("<question_{i}>answer number {i}</question_{i}>"))
        .collect();
    form(&format!(
        "<group>{questions}</group>{}{}",
        block(
            "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10",
            "<n0:create><n0:case_name>Monica Achieng</n0:case_name>\
             <n0:case_type>pregnancy</n0:case_type><n0:owner_id>g-team</n0:owner_id></n0:create>\
             <n0:update><n0:edd>2026-09-01</n0:edd><n0:lmp>2025-11-25</n0:lmp>\
             <n0:village>Kisumu</n0:village><n0:phone>+254700000000</n0:phone></n0:update>"
        ),
        block(
            "c-child-a",
            "<n0:create><n0:case_name>Child A</n0:case_name><n0:case_type>child</n0:case_type>\
             </n0:create><n0:update><n0:age_months>14</n0:age_months></n0:update>\
             <n0:index><n0:parent case_type=\"pregnancy\">3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10\
             </n0:parent></n0:index>"
        ),
    ))
}

/// Prints µs per form (run with `--release -- --nocapture pathological`); the assertion only
/// guards against pathological slowness in an unoptimised build.
#[test]
fn a_3kb_form_parses_without_pathological_slowness() {
    let xml = speed_form();
    assert!((2500..3600).contains(&xml.len()), "{}", xml.len());
    let limits = Limits::default();
    assert_eq!(ok(&xml).blocks.len(), 2);
    let n = 2_000;
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(parse(std::hint::black_box(xml.as_bytes()), &limits).unwrap());
    }
    let per_form = start.elapsed() / n;
    eprintln!("casexml::parse: {} bytes, {per_form:?} per form", xml.len());
    assert!(per_form < Duration::from_millis(5), "{per_form:?}");
}
