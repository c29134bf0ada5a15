//! The elements of a restore payload, as HQ writes them: registration, the `user-groups`
//! fixture and the CaseXML v2 cases.
//!
//! What must hold: output is deterministic for a given case and directory; properties, indices
//! and attachments come out in name order (their maps are sorted).

use std::io;

use domain::{Case, Directory, Relationship, Timestamp};

use crate::xml::Xml;

const REGISTRATION_XMLNS: &str = "http://openrosa.org/user/registration";
const CASE_XMLNS: &str = "http://commcarehq.org/case/transaction/v2";

/// HQ `get_registration_element` (casexml/apps/phone/xml.py). HQ's `date` is the user's
/// `date_joined` as a date: here, when the user was created. There is no password hash and no
/// user data to send.
pub(crate) fn registration(
    x: &mut Xml,
    user: &str,
    username: &str,
    joined: Timestamp,
) -> io::Result<()> {
    x.open("Registration", &[("xmlns", REGISTRATION_XMLNS)])?;
    x.leaf("username", &[], username)?;
    x.leaf("password", &[], "")?;
    x.leaf("uuid", &[], user)?;
    x.leaf("date", &[], &date_only(joined))?;
    x.leaf("user_data", &[], "")?;
    x.close("Registration")
}

/// R47, HQ `UserGroupsFixtureProvider`: the user's case-sharing groups, always in full (the
/// phone derives its owner ids from it, which its case purge relies on). An empty `<groups/>`
/// is still sent, as HQ does.
pub(crate) fn groups_fixture(x: &mut Xml, directory: &Directory, user: &str) -> io::Result<()> {
    x.open("fixture", &[("id", "user-groups"), ("user_id", user)])?;
    let groups = directory.case_sharing_groups(user);
    if groups.is_empty() {
        x.leaf("groups", &[], "")?;
    } else {
        x.open("groups", &[])?;
        for id in groups {
            let name = directory.groups.get(id).map_or("", |g| g.name.as_str());
            x.open("group", &[("id", id.as_str())])?;
            x.leaf("name", &[], name)?;
            x.close("group")?;
        }
        x.close("groups")?;
    }
    x.close("fixture")
}

/// One CaseXML v2 case, as HQ's `get_case_element` with `V2CaseXMLGenerator`
/// (casexml/apps/phone/xml.py, casexml/apps/case/xml/generator.py) writes it for a phone that
/// does not hold the case yet: create (type, name, owner), update (external_id, date_opened as a
/// date, dynamic properties), index, attachment, and `<close/>` when the case is closed
/// (`CaseSyncUpdate` adds the close action for a closed case). caseledger has no sync log, so
/// it always sends the create block; the phone treats a create on a case it holds as an
/// overwrite of type, name and owner.
pub(crate) fn case_element(x: &mut Xml, case: &Case) -> io::Result<()> {
    let modified = case.modified_on.map(|t| t.to_string());
    let mut attrs = vec![("xmlns", CASE_XMLNS), ("case_id", case.case_id.as_str())];
    if let Some(m) = &modified {
        attrs.push(("date_modified", m.as_str()));
    }
    attrs.push(("user_id", case.user_id.as_str()));
    x.open("case", &attrs)?;
    x.line()?;

    x.indent()?;
    x.open("create", &[])?;
    x.leaf("case_type", &[], &case.case_type)?;
    x.leaf("case_name", &[], &case.case_name)?;
    x.leaf("owner_id", &[], &case.owner_id)?;
    x.close("create")?;
    x.line()?;

    let opened = case.opened_on.map(date_only);
    let has_update = case.external_id.is_some() || opened.is_some() || !case.properties.is_empty();
    if has_update {
        x.indent()?;
        x.open("update", &[])?;
        if let Some(e) = &case.external_id {
            x.leaf("external_id", &[], e)?;
        }
        if let Some(o) = &opened {
            // HQ sends date_opened as a date; the phone parses it with a date-only parser.
            x.leaf("date_opened", &[], o)?;
        }
        for (name, value) in &case.properties {
            x.named_leaf(&case.case_id, name, &[], value)?;
        }
        x.close("update")?;
        x.line()?;
    }

    if !case.indices.is_empty() {
        x.indent()?;
        x.open("index", &[])?;
        for (identifier, ix) in &case.indices {
            let mut attrs = vec![("case_type", ix.case_type.as_str())];
            // HQ writes `relationship` only for extensions; absent means child on the phone.
            if ix.relationship == Relationship::Extension {
                attrs.push(("relationship", ix.relationship.as_str()));
            }
            x.named_leaf(&case.case_id, identifier, &attrs, ix.case_id.as_str())?;
        }
        x.close("index")?;
        x.line()?;
    }

    if !case.attachments.is_empty() {
        // HQ (toggle MM_CASE_PROPERTIES) rewrites `src` to its download URL with
        // `from="remote"`; caseledger stores metadata only (R31) and sends it as recorded.
        x.indent()?;
        x.open("attachment", &[])?;
        for (identifier, a) in &case.attachments {
            let mut attrs = Vec::new();
            if let Some(src) = &a.src {
                attrs.push(("src", src.as_str()));
            }
            if let Some(from) = &a.from {
                attrs.push(("from", from.as_str()));
            }
            if let Some(name) = &a.name {
                attrs.push(("name", name.as_str()));
            }
            x.named_leaf(&case.case_id, identifier, &attrs, "")?;
        }
        x.close("attachment")?;
        x.line()?;
    }

    if case.closed {
        x.indent()?;
        x.leaf("close", &[], "")?;
        x.line()?;
    }
    x.close("case")?;
    x.line()
}

/// `YYYY-MM-DD` in UTC, HQ's `date_to_xml_string`.
pub(crate) fn date_only(t: Timestamp) -> String {
    let (y, m, d, ..) = t.parts();
    format!("{y:04}-{m:02}-{d:02}")
}
