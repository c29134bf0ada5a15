//! OpenRosa restore payloads (R44–R48): what a phone receives when it syncs.
//!
//! [`restore`] reads the projections, works out the user's footprint (R45, HQ's livequery), and
//! writes the payload with quick-xml's `Writer`: the `OpenRosaResponse` envelope, the sync
//! token, the registration block, the `user-groups` fixture (R47) and one CaseXML v2 `<case>` per
//! case (R46). It returns a [`Restore`] (the XML, the token, the case ids) or a
//! [`RestoreError`]; it knows nothing of HTTP, so a server maps `UnknownUser` to 401 and
//! `BadToken` to 412 itself.
//!
//! ```ignore
//! let payload = restore::restore(&engine, "u-maria", None)?;
//! let later = restore::restore(&engine, "u-maria", Some(&payload.token))?;
//! ```
//!
//! What must hold:
//! - The payload is well-formed XML whatever the stored text is: every text node and attribute is
//!   escaped, characters XML 1.0 cannot carry become U+FFFD, and an element name that is not an
//!   XML name (it can only come from a corrupt store) is left out rather than written (`xml`).
//! - The token's position never claims more than is both projected and durable, so a later
//!   `since` can only send a case again, never skip one (R48).
//! - Output is deterministic for a given store apart from the token's random part and the
//!   registration date: cases are sorted by id, properties and indices by name.
//!
//! A token names the position it was issued at and is bound to its user and project space by
//! a digest, so a token of another user or project space is refused ([`RestoreError::BadToken`]).
//!
//! It is not a sync log. HQ stores, per token, the case ids it sent and diffs against them;
//! caseledger keeps nothing per token (R48 allows a full restore every time). An incremental
//! restore therefore works from the log instead, see [`restore`] for what it sends and misses.

mod error;
mod footprint;
mod payload;
mod xml;

use std::collections::BTreeSet;

use domain::{CaseId, DomainName, Position, UserId};
use engine::{now, Engine};
use sha2::{Digest, Sha256};

pub use error::RestoreError;
use footprint::Graph;
use xml::Xml;

const RESPONSE_XMLNS: &str = "http://openrosa.org/http/response";
const SYNC_XMLNS: &str = "http://commcarehq.org/sync";

/// One restore payload.
#[derive(Debug, Clone)]
pub struct Restore {
    /// The `OpenRosaResponse` document.
    pub xml: String,
    /// The sync token (`restore_id`) to pass back as `since` next time (R48).
    pub token: String,
    /// The cases in the payload, sorted by id.
    pub cases: Vec<CaseId>,
}

/// Builds the restore payload of `user`, in full or (with `since`) incrementally.
///
/// A full restore sends every case of the footprint (R45). An incremental one (`since` = a token
/// from an earlier restore, R48) sends:
/// - every case of the footprint whose history has an event after the token, together with the
///   footprint cases it pulls in (its index targets and open extensions, recursively), so that a
///   new child arrives with its parent and a new extension with its host and siblings;
/// - every case still owned by one of the user's owner ids that changed after the token but is
///   no longer in the footprint (closed, or an extension whose host closed), so the phone learns
///   of the close and purges it — HQ sends such cases because they are on the phone and modified;
/// - the whole footprint if the user's owner ids may have changed since the token (a membership
///   change of the user, or a case-sharing switch of one of the user's groups), because cases
///   that entered the footprint that way did not change.
///
/// Not sent: a case that left the footprint and is no longer owned by any of the user's owner
/// ids. For a case of a group the user left, HQ sends nothing either: the phone recomputes its
/// footprint from its owner ids, which it reads from the `user-groups` fixture (sent in full every
/// time for that reason, R47), and purges the rest. A case reassigned away after the token *is*
/// sent by HQ (it is on the phone and modified); without a sync log caseledger cannot tell it
/// was on the phone, so the phone keeps a stale copy until its next full restore.
pub fn restore(engine: &Engine, user: &str, since: Option<&str>) -> Result<Restore, RestoreError> {
    let projections = engine.projections();
    // R48: the token stands for a position that is projected and durable. Read before anything
    // else: what the queries below see is at least this new, so `since` may resend, never skip.
    let at = projections.checkpoint().min(engine.log().durable_head());
    let since = since
        .map(|t| {
            let p = parse_token(t, at)?;
            check_issued_to(t, engine.domain(), user)?;
            Ok::<_, RestoreError>(p)
        })
        .transpose()?;
    let directory = projections.directory();
    let (username, joined) = directory
        .users
        .get(&UserId::new(user))
        .map(|u| (u.username.clone(), u.created_on))
        .ok_or_else(|| RestoreError::UnknownUser(user.to_owned()))?;
    let owner_ids: BTreeSet<String> = directory.owner_ids(user).into_iter().collect();

    let mut graph = Graph::new(projections);
    let live = graph.footprint(&owner_ids)?;
    let send = match since {
        None => live,
        Some(since) => graph.changed(engine, &directory, user, &owner_ids, &live, since, at)?,
    };

    let token = issue_token(at, engine.domain(), user);
    let mut x = Xml::new();
    x.open("OpenRosaResponse", &[("xmlns", RESPONSE_XMLNS)])?;
    x.line()?;
    // HQ: restore.py starts every payload with this message and this nature.
    x.leaf(
        "message",
        &[("nature", "ota_restore_success")],
        &format!("Successfully restored account {username}!"),
    )?;
    x.line()?;
    x.open("Sync", &[("xmlns", SYNC_XMLNS)])?;
    x.leaf("restore_id", &[], &token)?;
    x.close("Sync")?;
    x.line()?;
    payload::registration(&mut x, user, &username, joined.unwrap_or_else(now))?;
    x.line()?;
    payload::groups_fixture(&mut x, &directory, user)?;
    x.line()?;
    for id in &send {
        if let Some(case) = graph.get(id)? {
            payload::case_element(&mut x, &case)?;
        }
    }
    x.close("OpenRosaResponse")?;
    x.line()?;
    Ok(Restore {
        xml: x.finish(),
        token,
        cases: send.into_iter().collect(),
    })
}

/// The 16 hex digits that bind a token's nonce and position to one user of one project space.
fn binding(domain: &DomainName, user: &str, position: &str, nonce: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"caseledger sync token\0")
        .chain_update(domain.as_str())
        .chain_update(b"\0")
        .chain_update(user)
        .chain_update(b"\0")
        .chain_update(position)
        .chain_update(b"\0")
        .chain_update(nonce)
        .finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// R48: `<position>-<nonce><binding>`, 16 hex digits each; the binding ties the token to the
/// user and project space it was issued to, so a foreign token is told apart without a sync log.
fn issue_token(at: Position, domain: &DomainName, user: &str) -> String {
    let uuid = uuid::Uuid::new_v4().simple().to_string();
    let nonce = uuid.get(..16).unwrap_or(&uuid);
    let position = at.0.to_string();
    let bound = binding(domain, user, &position, nonce);
    format!("{position}-{nonce}{bound}")
}

/// Refuses a token issued to another user or project space, or not issued by this code (a
/// token of an earlier version, before tokens were bound): the phone then restores in full,
/// as HQ's 412 makes it. The binding is a digest, not a secret: it tells a phone's mistake
/// apart, and a forged token could only ever restore the caller's own cases.
fn check_issued_to(token: &str, domain: &DomainName, user: &str) -> Result<(), RestoreError> {
    let foreign = || {
        RestoreError::BadToken(format!(
            "{token:?}: not issued to user {user:?} of project space {domain}"
        ))
    };
    let (position, rest) = token.split_once('-').ok_or_else(foreign)?;
    if rest.len() != 32 || !rest.is_char_boundary(16) {
        return Err(foreign());
    }
    let (nonce, bound) = rest.split_at(16);
    if binding(domain, user, position, nonce) == bound {
        Ok(())
    } else {
        Err(foreign())
    }
}

/// R48: a token is `<position>-<random>`; only the position says what was sent.
fn parse_token(token: &str, at: Position) -> Result<Position, RestoreError> {
    let bad = |why: &str| RestoreError::BadToken(format!("{token:?}: {why}"));
    let (position, random) = token
        .split_once('-')
        .ok_or_else(|| bad("expected <position>-<random>"))?;
    if random.is_empty() || position.is_empty() || !position.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("expected <position>-<random>"));
    }
    let position = position
        .parse::<u64>()
        .map(Position)
        .map_err(|_| bad("position out of range"))?;
    if position > at {
        return Err(bad(&format!("position is ahead of this store ({at})")));
    }
    Ok(position)
}

#[cfg(test)]
mod tests;
