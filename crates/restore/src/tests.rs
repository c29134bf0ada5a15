//! Unit tests of the pure parts: escaping, names, tokens, dates, the writer's bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use domain::{CaseId, DomainName, Position, Timestamp};

use crate::payload::date_only;
use crate::xml::{escape, is_xml_name, Xml};
use crate::{parse_token, RestoreError};

#[test]
fn text_and_attributes_are_escaped() {
    assert_eq!(
        escape(r#"a<b>&"c" 'd'"#, false),
        r#"a&lt;b&gt;&amp;"c" 'd'"#
    );
    assert_eq!(
        escape("a<b>&\"c\"\n\t\r", true),
        "a&lt;b&gt;&amp;&quot;c&quot;&#10;&#9;&#13;"
    );
    assert_eq!(escape("line\nbreak\r\n", false), "line\nbreak&#13;\n");
}

#[test]
fn characters_xml_cannot_carry_become_replacement_characters() {
    assert_eq!(
        escape("a\u{0}b\u{1b}c\u{FFFE}", false),
        "a\u{FFFD}b\u{FFFD}c\u{FFFD}"
    );
    assert_eq!(escape("Wanjirũ 🤰", false), "Wanjirũ 🤰");
}

#[test]
fn element_names_are_checked() {
    for ok in ["edd", "_x", "anc_visits", "a-b.c1", "jina_la_mtoto", "ñame"] {
        assert!(is_xml_name(ok), "{ok}");
    }
    for bad in ["", "1a", "-a", "a b", "n0:edd", "a<b", "a\"b"] {
        assert!(!is_xml_name(bad), "{bad}");
    }
}

/// The bytes the writer produces for leaves, attributes and data names, quotes and apostrophes
/// included: quick-xml's own escapers would write `&apos;`, the payload keeps them as they are.
#[test]
fn the_writer_escapes_through_one_function() {
    let case = CaseId::new("c-1");
    let mut x = Xml::new();
    x.open("a", &[("k", "it's \"q\"\n<&>")]).unwrap();
    x.leaf("b", &[], "O'Brien \"x\" <&>\r").unwrap();
    x.leaf("c", &[("k", "v")], "").unwrap();
    x.named_leaf(&case, "bad name", &[], "dropped").unwrap();
    x.named_leaf(&case, "ok", &[], "kept").unwrap();
    x.line().unwrap();
    x.indent().unwrap();
    x.close("a").unwrap();
    assert_eq!(
        x.finish(),
        "<a k=\"it's &quot;q&quot;&#10;&lt;&amp;&gt;\">\
         <b>O'Brien \"x\" &lt;&amp;&gt;&#13;</b><c k=\"v\"/><ok>kept</ok>\n  </a>"
    );
}

#[test]
fn r48_tokens_carry_a_position_and_a_random_part() {
    let at = Position(40);
    assert_eq!(parse_token("12-0f3a", at).map(|p| p.0).ok(), Some(12));
    assert_eq!(parse_token("40-x", at).map(|p| p.0).ok(), Some(40));
    for bad in [
        "",
        "12",
        "12-",
        "-x",
        "x-12",
        "+1-x",
        "41-x",
        "99999999999999999999-x",
    ] {
        assert!(
            matches!(parse_token(bad, at), Err(RestoreError::BadToken(_))),
            "{bad}"
        );
    }
}

#[test]
fn dates_are_utc_calendar_days() {
    let t = Timestamp::parse_phone("2026-03-02T01:15:22.104+03:00").unwrap();
    assert_eq!(date_only(t), "2026-03-01");
}

#[test]
fn r48_a_token_is_bound_to_its_user_and_project_space() {
    let demo = DomainName::new("demo");
    let token = crate::issue_token(Position(12), &demo, "u1");
    assert_eq!(
        parse_token(&token, Position(40)).map(|p| p.0).ok(),
        Some(12)
    );
    assert!(crate::check_issued_to(&token, &demo, "u1").is_ok());
    for (domain, user) in [("demo", "u2"), ("other", "u1")] {
        assert!(matches!(
            crate::check_issued_to(&token, &DomainName::new(domain), user),
            Err(RestoreError::BadToken(_))
        ));
    }
    // Another position with the same nonce and binding is refused too.
    let moved = token.replacen("12-", "11-", 1);
    assert!(crate::check_issued_to(&moved, &demo, "u1").is_err());
}
