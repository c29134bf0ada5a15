//! `caseledger demo`: the seed page's case-sharing stories, end to end, in a fresh data dir.
//!
//! Every form is real CommCare wire XML (built by [`form`]) submitted through the engine, so the
//! demo exercises the same path as the CLI and the conformance suite.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use domain::{AppId, Command, GroupId, Timestamp, UserId};
use engine::{Engine, EngineConfig, Request, SubmitStatus};

/// One case block of a demo form.
pub struct Block<'a> {
    /// Case id.
    pub case_id: &'a str,
    /// Block user.
    pub user: &'a str,
    /// `date_modified`.
    pub date: &'a str,
    /// `Some((type, name, owner))` for a create block.
    pub create: Option<(&'a str, &'a str, Option<&'a str>)>,
    /// Update properties.
    pub update: &'a [(&'a str, &'a str)],
    /// Close the case.
    pub close: bool,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Builds a CommCare form submission with the given case blocks.
pub fn form(instance_id: &str, user: &str, blocks: &[Block<'_>]) -> Vec<u8> {
    let mut x = String::from(
        "<?xml version='1.0' ?><data xmlns=\"http://openrosa.org/formdesigner/DEMO-FORM\" uiVersion=\"1\" version=\"1\" name=\"Demo\">\n",
    );
    for b in blocks {
        x.push_str(&format!(
            "  <n0:case xmlns:n0=\"http://commcarehq.org/case/transaction/v2\" case_id=\"{}\" date_modified=\"{}\" user_id=\"{}\">\n",
            esc(b.case_id),
            esc(b.date),
            esc(b.user)
        ));
        if let Some((ty, name, owner)) = b.create {
            x.push_str(&format!(
                "    <n0:create><n0:case_name>{}</n0:case_name><n0:case_type>{}</n0:case_type>",
                esc(name),
                esc(ty)
            ));
            if let Some(o) = owner {
                x.push_str(&format!("<n0:owner_id>{}</n0:owner_id>", esc(o)));
            }
            x.push_str("</n0:create>\n");
        }
        if !b.update.is_empty() {
            x.push_str("    <n0:update>");
            for (k, v) in b.update {
                x.push_str(&format!("<n0:{k}>{}</n0:{k}>", esc(v)));
            }
            x.push_str("</n0:update>\n");
        }
        if b.close {
            x.push_str("    <n0:close/>\n");
        }
        x.push_str("  </n0:case>\n");
    }
    x.push_str(&format!(
        "  <n1:meta xmlns:n1=\"http://openrosa.org/jr/xforms\"><n1:userID>{}</n1:userID><n1:instanceID>{}</n1:instanceID></n1:meta>\n</data>\n",
        esc(user),
        esc(instance_id)
    ));
    x.into_bytes()
}

struct Demo<'e> {
    engine: &'e Engine,
    out: std::io::StdoutLock<'static>,
}

impl Demo<'_> {
    async fn cmd(&mut self, command: Command) -> Result<()> {
        self.engine.execute(Request::new(command)).await?;
        Ok(())
    }

    async fn user(&mut self, id: &str, name: &str) -> Result<()> {
        self.cmd(Command::CreateUser {
            id: UserId::new(id),
            username: name.into(),
        })
        .await
    }

    async fn group(&mut self, id: &str, name: &str, members: &[&str]) -> Result<()> {
        self.cmd(Command::CreateGroup {
            id: GroupId::new(id),
            name: name.into(),
            case_sharing: true,
        })
        .await?;
        for m in members {
            self.cmd(Command::AddMember {
                group: GroupId::new(id),
                user: UserId::new(*m),
            })
            .await?;
        }
        Ok(())
    }

    async fn app(&mut self, id: &str, sharing: bool, types: &[&str]) -> Result<()> {
        self.cmd(Command::CreateApp {
            id: AppId::new(id),
            name: id.into(),
            case_sharing: sharing,
            case_types: types.iter().map(|t| (*t).to_owned()).collect(),
        })
        .await
    }

    async fn submit(&mut self, what: &str, app: &str, xml: Vec<u8>, at: &str) -> Result<()> {
        let at = Timestamp::parse_rfc3339(at).context("demo received time")?;
        let o = self
            .engine
            .submit(xml, Some(AppId::new(app)), Some(at))
            .await?;
        let status = match (&o.outcome, &o.error) {
            (SubmitStatus::Rejected, Some(e)) => format!("REJECTED {}", e.code),
            (s, _) => format!("{s:?}").to_uppercase(),
        };
        writeln!(self.out, "  {what:<58} {status}")?;
        Ok(())
    }

    fn sees(&mut self, users: &[&str]) -> Result<()> {
        for u in users {
            let cases = self.engine.projections().cases_for_user(u, false)?;
            let list: Vec<String> = cases
                .iter()
                .map(|c| format!("{} ({}, owner {})", c.case_name, c.case_type, c.owner_id))
                .collect();
            let shown = if list.is_empty() {
                "(nothing)".to_owned()
            } else {
                list.join("; ")
            };
            writeln!(self.out, "    {u:<10} sees {shown}")?;
        }
        Ok(())
    }

    fn story(&mut self, title: &str) -> Result<()> {
        writeln!(self.out, "\n{title}")?;
        Ok(())
    }
}

/// Runs every seed story in a fresh directory under `data` and prints what each user sees.
pub async fn run(data: &Path) -> Result<()> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let dir = data.join(format!("demo-{stamp}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let engine = Engine::open(&dir, &"demo".into(), EngineConfig::default())?;
    let mut d = Demo {
        engine: &engine,
        out: std::io::stdout().lock(),
    };
    writeln!(
        d.out,
        "caseledger demo: the Case Sharing help page's stories"
    )?;
    writeln!(d.out, "data dir: {}", dir.display())?;

    for (id, name) in [
        ("u-david", "david"),
        ("u-maria", "maria"),
        ("u-ana", "ana"),
        ("u-grace", "grace"),
        ("u-tom", "tom"),
        ("u-sup", "supervisor"),
    ] {
        d.user(id, name).await?;
    }
    d.group(
        "g-kibera",
        "Kibera CHW team",
        &["u-david", "u-maria", "u-grace", "u-sup"],
    )
    .await?;
    d.group("g-mathare", "Mathare CHW team", &["u-ana", "u-sup"])
        .await?;
    d.app("app-anc", true, &["pregnancy", "referral"]).await?;
    d.app("app-clinic", true, &["pregnancy"]).await?;

    d.story("1. David and Maria share one case list (seed use case 1, R38, R44)")?;
    let reg = |id: &str, case: &str, user: &str, name: &str, date: &str| {
        form(
            id,
            user,
            &[Block {
                case_id: case,
                user,
                date,
                create: Some(("pregnancy", name, None)),
                update: &[("edd", "2026-09-01")],
                close: false,
            }],
        )
    };
    d.submit(
        "david registers Monica (no owner_id)",
        "app-anc",
        reg(
            "f-1",
            "c-monica",
            "u-david",
            "Monica",
            "2026-03-02T09:15:22.104+03:00",
        ),
        "2026-03-02T06:20:00Z",
    )
    .await?;
    d.submit(
        "maria records an ANC visit for Monica",
        "app-anc",
        form(
            "f-2",
            "u-maria",
            &[Block {
                case_id: "c-monica",
                user: "u-maria",
                date: "2026-03-03T11:40:05.870+03:00",
                create: None,
                update: &[("anc_visits", "1")],
                close: false,
            }],
        ),
        "2026-03-03T08:45:00Z",
    )
    .await?;
    d.sees(&["u-david", "u-maria", "u-ana"])?;

    d.story("2. The clinic nurse's other app shares the case type (seed use case 2, R43)")?;
    d.submit(
        "grace records the clinic outcome through app-clinic",
        "app-clinic",
        form(
            "f-3",
            "u-grace",
            &[Block {
                case_id: "c-monica",
                user: "u-grace",
                date: "2026-03-05T10:00:00+03:00",
                create: None,
                update: &[("clinic_outcome", "admitted")],
                close: false,
            }],
        ),
        "2026-03-05T07:05:00Z",
    )
    .await?;
    d.sees(&["u-david", "u-grace"])?;

    d.story("3. Tom is in no case sharing group (seed: errors)")?;
    d.submit(
        "tom registers a client",
        "app-anc",
        reg(
            "f-4",
            "c-tom",
            "u-tom",
            "Wanjiru",
            "2026-03-06T09:00:00+03:00",
        ),
        "2026-03-06T06:05:00Z",
    )
    .await?;

    d.story("4. The supervisor in two groups reviews, then tries to create (seed: Advanced)")?;
    d.submit(
        "supervisor reviews Monica (update only)",
        "app-anc",
        form(
            "f-5",
            "u-sup",
            &[Block {
                case_id: "c-monica",
                user: "u-sup",
                date: "2026-03-07T09:00:00+03:00",
                create: None,
                update: &[("supervisor_reviewed", "yes")],
                close: false,
            }],
        ),
        "2026-03-07T06:05:00Z",
    )
    .await?;
    d.submit(
        "supervisor registers a client (no owner_id)",
        "app-anc",
        reg(
            "f-6",
            "c-sup",
            "u-sup",
            "Achieng",
            "2026-03-07T10:00:00+03:00",
        ),
        "2026-03-07T07:05:00Z",
    )
    .await?;
    d.sees(&["u-sup", "u-ana"])?;

    d.story("5. A case from before case sharing keeps its owner (FAQ 1, R41)")?;
    d.app("app-old", false, &["pregnancy"]).await?;
    d.submit(
        "david registers Zawadi through a non-sharing app",
        "app-old",
        reg(
            "f-7",
            "c-zawadi",
            "u-david",
            "Zawadi",
            "2026-03-08T09:00:00+03:00",
        ),
        "2026-03-08T06:05:00Z",
    )
    .await?;
    d.cmd(Command::SetAppCaseSharing {
        app: AppId::new("app-old"),
        on: true,
    })
    .await?;
    d.submit(
        "david updates Zawadi after sharing is on",
        "app-old",
        form(
            "f-8",
            "u-david",
            &[Block {
                case_id: "c-zawadi",
                user: "u-david",
                date: "2026-03-09T09:00:00+03:00",
                create: None,
                update: &[("anc_visits", "2")],
                close: false,
            }],
        ),
        "2026-03-09T06:05:00Z",
    )
    .await?;
    d.sees(&["u-david", "u-maria"])?;

    d.story("6. owner_id set to the user's own id keeps a case private (FAQ 4, R37)")?;
    d.submit(
        "david registers a private referral (owner_id = u-david)",
        "app-anc",
        form(
            "f-9",
            "u-david",
            &[Block {
                case_id: "c-private",
                user: "u-david",
                date: "2026-03-10T09:00:00+03:00",
                create: Some(("referral", "HIV status", Some("u-david"))),
                update: &[],
                close: false,
            }],
        ),
        "2026-03-10T06:05:00Z",
    )
    .await?;
    d.sees(&["u-david", "u-maria"])?;

    d.story("7. Two offline edits apply in server received order (FAQ 3, R70)")?;
    d.submit(
        "maria's edit (phone day 12) arrives first",
        "app-anc",
        form(
            "f-10",
            "u-maria",
            &[Block {
                case_id: "c-monica",
                user: "u-maria",
                date: "2026-03-12T09:00:00+03:00",
                create: None,
                update: &[("risk", "low")],
                close: false,
            }],
        ),
        "2026-03-13T06:05:00Z",
    )
    .await?;
    d.submit(
        "david's edit (phone day 11) arrives second",
        "app-anc",
        form(
            "f-11",
            "u-david",
            &[Block {
                case_id: "c-monica",
                user: "u-david",
                date: "2026-03-11T09:00:00+03:00",
                create: None,
                update: &[("risk", "high")],
                close: false,
            }],
        ),
        "2026-03-13T07:05:00Z",
    )
    .await?;
    if let Some(c) = engine.projections().case(&"c-monica".into())? {
        let risk = c.properties.get("risk").map_or("-", String::as_str);
        writeln!(
            d.out,
            "    Monica: risk={risk}, user_id={}, modified_on={}",
            c.user_id,
            c.modified_on.map(|t| t.to_string()).unwrap_or_default()
        )?;
    }

    d.story("8. An update to a closed case leaves it closed (FAQ 3, R22)")?;
    d.submit(
        "maria closes Monica after delivery",
        "app-anc",
        form(
            "f-12",
            "u-maria",
            &[Block {
                case_id: "c-monica",
                user: "u-maria",
                date: "2026-03-20T09:00:00+03:00",
                create: None,
                update: &[],
                close: true,
            }],
        ),
        "2026-03-20T06:05:00Z",
    )
    .await?;
    d.submit(
        "david's late visit form updates the closed case",
        "app-anc",
        form(
            "f-13",
            "u-david",
            &[Block {
                case_id: "c-monica",
                user: "u-david",
                date: "2026-03-19T09:00:00+03:00",
                create: None,
                update: &[("pnc_visit", "done")],
                close: false,
            }],
        ),
        "2026-03-20T07:05:00Z",
    )
    .await?;
    if let Some(c) = engine.projections().case(&"c-monica".into())? {
        writeln!(
            d.out,
            "    Monica: closed={}, closed_by={}, pnc_visit={}",
            c.closed,
            c.closed_by.as_deref().unwrap_or("-"),
            c.properties.get("pnc_visit").map_or("-", String::as_str)
        )?;
    }
    d.sees(&["u-david", "u-maria"])?;

    writeln!(d.out, "\nDiagnostics:")?;
    for row in engine.projections().diagnostics()? {
        writeln!(
            d.out,
            "  @{:<4} {:<36} {}",
            row.position, row.diagnostic.code, row.diagnostic.subject
        )?;
    }
    writeln!(
        d.out,
        "\n{} events in the log; try: caseledger --data {} log",
        engine.log().written_head(),
        dir.display()
    )?;
    engine.flush()?;
    Ok(())
}
