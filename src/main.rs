//! The `caseledger` command line: parse arguments, set up tracing, call the engine, print.
//!
//! Exit status (a contract scripts depend on): 0 when everything went through (duplicates
//! included), 2 when a submission was rejected (it is still stored), 1 for usage, IO or
//! unknown-id errors (nothing appended), 3 when `verify`, `export` or `import` found damage or
//! a modified export.
//!
//! One file past 600 lines: the argument definitions and their printing are the CLI contract and
//! read best together; the logic lives in the crates.

// glibc malloc's arena locks and consolidation were the top cost of replay in a profile
// (sled allocates per node and per update); mimalloc roughly halves that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod credentials;
mod serve;
mod travel;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use caseledger::domain::{
    AppId, AttachmentFile, CaseId, Command, FormId, GroupId, Position, Timestamp, UserId,
};
use caseledger::{
    view, Engine, EngineConfig, EngineError, Request, SubmitOutcome, SubmitStatus, UpgradeStatus,
};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "caseledger",
    version,
    about = "Event-sourced CommCare case store with case sharing"
)]
struct Cli {
    /// Data directory (default: $CASELEDGER_DATA, else ./caseledger-data).
    #[arg(
        long,
        global = true,
        env = "CASELEDGER_DATA",
        default_value = "caseledger-data"
    )]
    data: PathBuf,
    /// Project space.
    #[arg(long, global = true, default_value = "demo")]
    domain: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OnOff {
    On,
    Off,
}

impl OnOff {
    fn on(self) -> bool {
        matches!(self, OnOff::On)
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Mobile workers.
    #[command(subcommand)]
    User(UserCmd),
    /// Groups and memberships.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Applications.
    #[command(subcommand)]
    App(AppCmd),
    /// Submit form XML files, in order.
    Submit {
        /// Files to submit.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The app the forms are submitted through.
        #[arg(long)]
        app: Option<String>,
        /// Server received time (RFC 3339) instead of now.
        #[arg(long)]
        received_at: Option<String>,
        /// A file sent with the form, as a phone's multipart upload would (repeatable; one FILE
        /// only). Kept verbatim under its file name, which `<attachment src=…>` refers to (R31).
        #[arg(long = "attachment")]
        attachments: Vec<PathBuf>,
    },
    /// Cases.
    #[command(subcommand)]
    Case(CaseCmd),
    /// A case list: by user (R44) or by owner.
    Cases {
        /// Cases the user sees: owned by the user or the user's case-sharing groups.
        #[arg(long, conflicts_with = "owner", required_unless_present = "owner")]
        user: Option<String>,
        /// Cases owned by this id.
        #[arg(long)]
        owner: Option<String>,
        /// Include closed cases.
        #[arg(long)]
        include_closed: bool,
        #[command(flatten)]
        at: travel::At,
    },
    /// Groups and their members.
    Groups {
        /// Only groups listing this user.
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        at: travel::At,
    },
    /// Validation diagnostics (R59–R66).
    Diagnostics {
        #[command(flatten)]
        at: travel::At,
    },
    /// Conflicts between offline edits: a block made earlier on the phone that overwrote a
    /// value another form set later on its phone (base, theirs, mine, result).
    Conflicts {
        /// Only this case's.
        #[arg(long)]
        case: Option<String>,
        /// Only those where this user made either side.
        #[arg(long)]
        user: Option<String>,
        #[command(subcommand)]
        show: Option<ConflictsCmd>,
    },
    /// Read the event log.
    Log {
        /// First position.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Rebuild every projection from the log and swap it in.
    Replay {
        /// Rebuild beside the live projections, report every key where they differ (exit 1 if
        /// any), and swap nothing.
        #[arg(long)]
        verify: bool,
    },
    /// Check every envelope and the hash chain from a position; print the head and its hash
    /// (exit 3 naming the first bad position).
    Verify {
        /// First position to check (its stored previous hash is taken on trust).
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
    /// Export the log as JSON lines, one per event, with hashes and raw submissions.
    Export {
        /// Output format.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// First position.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Last position (default: the head).
        #[arg(long)]
        to: Option<u64>,
    },
    /// Rebuild an empty data dir (`--data`) from an export, checking every line's chain.
    Import {
        /// The export (JSON lines).
        file: PathBuf,
        /// Refuse unless the export ends at this head hash (hex), e.g. a published one.
        #[arg(long)]
        head: Option<String>,
    },
    /// Archive or unarchive a form (R57).
    #[command(subcommand)]
    Form(FormCmd),
    /// Re-decide a stored rejected form after its cause was fixed (R56).
    Reprocess {
        /// The form's instanceID.
        form_id: String,
    },
    /// Print the OpenRosa restore XML a phone of this user would receive (R45–R48).
    Restore {
        /// The mobile worker.
        #[arg(long)]
        user: String,
        /// Sync token of an earlier restore: only what changed after it.
        #[arg(long)]
        since: Option<String>,
    },
    /// Run the seed's case-sharing stories in a fresh data dir and show what each user sees.
    Demo,
    /// API keys for services and auditors (the server's `Authorization: ApiKey user:key`).
    #[command(subcommand)]
    Apikey(credentials::ApiKeyCmd),
    /// Serve the CommCare phone routes over HTTP until SIGTERM or SIGINT (docs/API.md).
    Serve(serve::ServeArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ExportFormat {
    Jsonl,
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Create a mobile worker.
    Create {
        #[arg(long)]
        id: String,
        #[arg(long)]
        username: String,
        #[command(flatten)]
        password: credentials::PasswordArgs,
    },
    /// Set or replace a mobile worker's password (only its argon2id hash is recorded).
    SetPassword(credentials::SetPasswordArgs),
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Create a group.
    Create {
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        case_sharing: bool,
    },
    /// Turn a group's case sharing on or off.
    SetCaseSharing { group: String, state: OnOff },
    /// Add a user to a group.
    AddMember { group: String, user: String },
    /// Remove a user from a group.
    RemoveMember { group: String, user: String },
}

#[derive(Subcommand, Debug)]
enum AppCmd {
    /// Create an app.
    Create {
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        case_sharing: bool,
        /// A case type its case lists show (repeat the flag).
        #[arg(long = "case-type")]
        case_types: Vec<String>,
    },
    /// Turn an app's case sharing on or off.
    SetCaseSharing { app: String, state: OnOff },
}

#[derive(Subcommand, Debug)]
enum FormCmd {
    /// Revoke a form's case effects; affected cases are rebuilt without it.
    Archive { form_id: String },
    /// Restore an archived form's case effects at its original position.
    Unarchive { form_id: String },
}

#[derive(Subcommand, Debug)]
enum CaseCmd {
    /// Show one case (as of now, or `--at`/`--as-of` a point of the log).
    Show {
        case_id: String,
        #[command(flatten)]
        at: travel::At,
    },
    /// Every change to a case, oldest first, with the forms that caused them.
    History { case_id: String },
    /// The users whose case list held the case, and since which position.
    WhoCouldSee {
        case_id: String,
        #[command(flatten)]
        at: travel::At,
    },
}

#[derive(Subcommand, Debug)]
enum ConflictsCmd {
    /// One conflict, three-way, with the positions to time-travel to.
    Show { id: String },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CASELEDGER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

pub(crate) fn out(value: &Value) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, value)?;
    writeln!(stdout)?;
    Ok(())
}

pub(crate) fn print_line(line: &str) -> Result<()> {
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(())
}

async fn run(cli: Cli) -> Result<u8> {
    if let Cmd::Serve(args) = &cli.command {
        return serve::run(&cli.data, args);
    }
    if let Cmd::Demo = cli.command {
        return caseledger::demo::run(&cli.data).await.map(|()| 0);
    }
    if matches!(
        cli.command,
        Cmd::Verify { .. } | Cmd::Export { .. } | Cmd::Import { .. }
    ) {
        return audit(&cli);
    }
    // The log alone: nothing derived from it (projections) can keep anyone from reading it.
    if let Cmd::Log { from, limit } = cli.command {
        let log = Engine::open_log(
            &cli.data,
            &cli.domain.as_str().into(),
            &EngineConfig::default(),
        )
        .with_context(|| format!("opening {}", cli.data.display()))?;
        return print_log(&log, &cli, from, limit);
    }
    let engine = Engine::open(
        &cli.data,
        &cli.domain.as_str().into(),
        EngineConfig::default(),
    )
    .with_context(|| format!("opening {}", cli.data.display()))?;
    // A one-shot command answers from projections folded by other rules rather than rebuild
    // them first (they read; a rebuild can take minutes): say so, and what rebuilds them.
    if let UpgradeStatus::Needed { stored, current } = engine.upgrade_status() {
        if !matches!(cli.command, Cmd::Replay { verify: false }) {
            tracing::warn!(
                stored_rules = stored,
                current_rules = current,
                "the projections were built by other rules than this build's and answer as \
                 they are; `caseledger replay` rebuilds them"
            );
        }
    }
    let result = dispatch(&engine, &cli).await;
    // Damaged projections were rebuilt from the log (on open or by a query); say so.
    for d in engine.repaired() {
        eprintln!("warning: damaged projections rebuilt from the log: {d}");
    }
    let code = result?;
    engine.flush()?;
    Ok(code)
}

async fn command(engine: &Engine, cli: &Cli, cmd: Command, done: &str) -> Result<u8> {
    let outcome = engine.execute(Request::new(cmd)).await?;
    let last = outcome.events.last().map(|e| e.position.0);
    if cli.json {
        out(&json!({"ok": true, "position": last, "events": outcome.events.len()}))?;
    } else {
        let at = last.map_or("no change".to_owned(), |p| format!("@{p}"));
        print_line(&format!("{done} ({at})"))?;
    }
    Ok(0)
}

async fn dispatch(engine: &Engine, cli: &Cli) -> Result<u8> {
    match &cli.command {
        Cmd::User(UserCmd::Create {
            id,
            username,
            password,
        }) => credentials::create_user(engine, cli.json, id, username, password).await,
        Cmd::User(UserCmd::SetPassword(args)) => {
            credentials::set_password(engine, cli.json, args).await
        }
        Cmd::Apikey(cmd) => credentials::apikey(engine, cli.json, cmd).await,
        Cmd::Group(g) => {
            let (cmd, done) = match g {
                GroupCmd::Create {
                    id,
                    name,
                    case_sharing,
                } => (
                    Command::CreateGroup {
                        id: GroupId::new(id.as_str()),
                        name: name.clone(),
                        case_sharing: *case_sharing,
                    },
                    format!("group {id} created"),
                ),
                GroupCmd::SetCaseSharing { group, state } => (
                    Command::SetGroupCaseSharing {
                        group: GroupId::new(group.as_str()),
                        on: state.on(),
                    },
                    format!("group {group} case sharing {state:?}"),
                ),
                GroupCmd::AddMember { group, user } => (
                    Command::AddMember {
                        group: GroupId::new(group.as_str()),
                        user: UserId::new(user.as_str()),
                    },
                    format!("{user} added to {group}"),
                ),
                GroupCmd::RemoveMember { group, user } => (
                    Command::RemoveMember {
                        group: GroupId::new(group.as_str()),
                        user: UserId::new(user.as_str()),
                    },
                    format!("{user} removed from {group}"),
                ),
            };
            command(engine, cli, cmd, &done).await
        }
        Cmd::App(a) => {
            let (cmd, done) = match a {
                AppCmd::Create {
                    id,
                    name,
                    case_sharing,
                    case_types,
                } => (
                    Command::CreateApp {
                        id: AppId::new(id.as_str()),
                        name: name.clone(),
                        case_sharing: *case_sharing,
                        case_types: case_types.clone(),
                    },
                    format!("app {id} created"),
                ),
                AppCmd::SetCaseSharing { app, state } => (
                    Command::SetAppCaseSharing {
                        app: AppId::new(app.as_str()),
                        on: state.on(),
                    },
                    format!("app {app} case sharing {state:?}"),
                ),
            };
            command(engine, cli, cmd, &done).await
        }
        Cmd::Submit {
            files,
            app,
            received_at,
            attachments,
        } => {
            submit(
                engine,
                cli,
                files,
                attachments,
                app.as_deref(),
                received_at.as_deref(),
            )
            .await
        }
        Cmd::Case(CaseCmd::Show { case_id, at }) if at.is_set() => {
            travel::case_show(engine, cli.json, case_id, at)
        }
        Cmd::Case(CaseCmd::History { case_id }) => travel::case_history(engine, cli.json, case_id),
        Cmd::Case(CaseCmd::WhoCouldSee { case_id, at }) => {
            travel::who_could_see(engine, cli.json, case_id, at)
        }
        Cmd::Conflicts {
            show: Some(ConflictsCmd::Show { id }),
            ..
        } => travel::conflict_show(engine, cli.json, id),
        Cmd::Conflicts {
            case,
            user,
            show: None,
        } => travel::conflicts(engine, cli.json, case.as_deref(), user.as_deref()),
        Cmd::Case(CaseCmd::Show { case_id, .. }) => {
            match engine.query(|p| p.case(&CaseId::new(case_id.as_str())))? {
                Some(case) => {
                    if cli.json {
                        out(&view::case_json(&case))?;
                    } else {
                        print_case(&case)?;
                    }
                    Ok(0)
                }
                None => {
                    eprintln!("error: no case {case_id}");
                    Ok(1)
                }
            }
        }
        Cmd::Cases {
            user,
            owner,
            include_closed,
            at,
        } => {
            let cases = if at.is_set() {
                match travel::cases(
                    engine,
                    user.as_deref(),
                    owner.as_deref(),
                    *include_closed,
                    at,
                )? {
                    Some(cases) => cases,
                    None => {
                        eprintln!(
                            "error: unknown user {} at that point",
                            user.as_deref().unwrap_or("")
                        );
                        return Ok(1);
                    }
                }
            } else {
                match (user, owner) {
                    (Some(u), _) => {
                        if !engine
                            .projections()
                            .directory()
                            .users
                            .contains_key(&UserId::new(u.as_str()))
                        {
                            eprintln!("error: unknown user {u}");
                            return Ok(1);
                        }
                        engine.query(|p| p.cases_for_user(u, *include_closed))?
                    }
                    (None, Some(o)) => engine.query(|p| p.cases_by_owner(o, *include_closed))?,
                    (None, None) => anyhow::bail!("give --user or --owner"),
                }
            };
            if cli.json {
                out(&Value::Array(cases.iter().map(view::case_json).collect()))?;
            } else {
                print_line(&format!(
                    "{:<38} {:<12} {:<24} {:<14} {:<10} {}",
                    "CASE_ID", "TYPE", "NAME", "OWNER", "USER", "STATUS"
                ))?;
                for c in &cases {
                    print_line(&format!(
                        "{:<38} {:<12} {:<24} {:<14} {:<10} {}",
                        c.case_id,
                        c.case_type,
                        c.case_name,
                        c.owner_id,
                        c.user_id,
                        if c.closed { "closed" } else { "open" }
                    ))?;
                }
                print_line(&format!("{} case(s)", cases.len()))?;
            }
            Ok(0)
        }
        Cmd::Groups { user, at } => {
            let groups = if at.is_set() {
                let p = at.resolve(engine)?;
                engine.query(|proj| proj.groups_at(user.as_deref(), p))?
            } else {
                engine.projections().groups(user.as_deref())
            };
            if cli.json {
                out(&Value::Array(groups.iter().map(view::group_json).collect()))?;
            } else {
                print_line(&format!(
                    "{:<16} {:<24} {:<8} MEMBERS",
                    "GROUP", "NAME", "SHARING"
                ))?;
                for g in &groups {
                    print_line(&format!(
                        "{:<16} {:<24} {:<8} {}",
                        g.id,
                        g.name,
                        if g.case_sharing { "on" } else { "off" },
                        g.members.join(", ")
                    ))?;
                }
            }
            Ok(0)
        }
        Cmd::Diagnostics { at } => {
            let rows = if at.is_set() {
                let p = at.resolve(engine)?;
                engine.query(|proj| proj.diagnostics_at(p))?
            } else {
                engine.query(|p| p.diagnostics())?
            };
            if cli.json {
                out(&Value::Array(
                    rows.iter().map(view::diagnostic_json).collect(),
                ))?;
            } else {
                print_line(&format!(
                    "{:<8} {:<38} {:<40} DETAIL",
                    "POS", "CODE", "SUBJECT"
                ))?;
                for d in &rows {
                    print_line(&format!(
                        "{:<8} {:<38} {:<40} {}",
                        d.position, d.diagnostic.code, d.diagnostic.subject, d.diagnostic.detail
                    ))?;
                }
            }
            Ok(0)
        }
        Cmd::Log { from, limit } => print_log(engine.log(), cli, *from, *limit),
        Cmd::Replay { verify: false } => replay(engine, cli),
        Cmd::Replay { verify: true } => verify(engine, cli),
        Cmd::Form(f) => {
            let (cmd, done) = match f {
                FormCmd::Archive { form_id } => (
                    Command::ArchiveForm {
                        form: FormId::new(form_id.as_str()),
                    },
                    format!("form {form_id} archived"),
                ),
                FormCmd::Unarchive { form_id } => (
                    Command::UnarchiveForm {
                        form: FormId::new(form_id.as_str()),
                    },
                    format!("form {form_id} unarchived"),
                ),
            };
            command(engine, cli, cmd, &done).await
        }
        Cmd::Reprocess { form_id } => {
            let outcome = engine.reprocess(&FormId::new(form_id.as_str())).await?;
            print_outcome(cli, form_id, &outcome)?;
            Ok(if outcome.outcome == SubmitStatus::Rejected {
                2
            } else {
                0
            })
        }
        Cmd::Restore { user, since } => {
            let restore = caseledger::restore::restore(engine, user, since.as_deref())?;
            if cli.json {
                out(&json!({"token": restore.token, "cases": restore.cases, "xml": restore.xml}))?;
            } else {
                print_line(&restore.xml)?;
            }
            Ok(0)
        }
        Cmd::Demo
        | Cmd::Serve(_)
        | Cmd::Verify { .. }
        | Cmd::Export { .. }
        | Cmd::Import { .. } => Ok(0),
    }
}

/// `verify`, `export`, `import`: on the log alone, without opening the engine (exit 3: damage
/// or a refused export).
fn audit(cli: &Cli) -> Result<u8> {
    use caseledger::audit::{self, AuditError};
    use caseledger::eventlog::chain::to_hex;
    enum Done {
        Verified(audit::VerifyReport),
        Exported,
        Imported(audit::ImportReport),
    }
    let domain = cli.domain.as_str().into();
    let result = match &cli.command {
        Cmd::Verify { from } => {
            audit::verify(&cli.data, &domain, Position(*from)).map(Done::Verified)
        }
        Cmd::Export {
            format: ExportFormat::Jsonl,
            from,
            to,
        } => {
            let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
            let from = Position(*from);
            audit::export(&cli.data, &domain, from, to.map(Position), &mut stdout)
                .map(|_| Done::Exported)
        }
        Cmd::Import { file, head } => {
            let head = head
                .as_deref()
                .map(|h| audit::parse_head(h).context("--head wants 64 hex digits"))
                .transpose()?;
            audit::import(file, &cli.data, &domain, head).map(Done::Imported)
        }
        _ => Ok(Done::Exported),
    };
    match result {
        Ok(Done::Verified(r)) if cli.json => out(&r.to_json())?,
        Ok(Done::Verified(r)) => {
            let v = &r.verified;
            print_line(&format!(
                "ok: {} entries checked from position {} ({} unchained)",
                v.entries, v.from, v.unchained
            ))?;
            print_line(&format!("head {} {}", v.head, to_hex(&v.head_hash)))?;
            if let Some(a) = r.acknowledged {
                print_line(&format!("acknowledged {} {}", a.position, to_hex(&a.hash)))?;
            }
        }
        Ok(Done::Exported) => {}
        Ok(Done::Imported(r)) if cli.json => out(&json!({
            "ok": true,
            "events": r.events,
            "head": r.head.position.0,
            "head_hash": to_hex(&r.head.hash),
        }))?,
        Ok(Done::Imported(r)) => print_line(&format!(
            "imported {} events into {}; head {} {}",
            r.events,
            cli.data.display(),
            r.head.position,
            to_hex(&r.head.hash)
        ))?,
        Err(e) if e.is_damage() => {
            if cli.json && matches!(cli.command, Cmd::Verify { .. }) {
                let position = match &e {
                    AuditError::Damaged { position, .. } => Some(*position),
                    _ => None,
                };
                out(&json!({"ok": false, "position": position, "error": e.to_string()}))?;
            }
            eprintln!("error: {e}");
            return Ok(3);
        }
        Err(e) => return Err(e.into()),
    }
    Ok(0)
}

/// Bodies up to this many times `Limits::max_bytes` are stored even when rejected as too large.
const TRANSPORT_FACTOR: u64 = 4;

async fn submit(
    engine: &Engine,
    cli: &Cli,
    files: &[PathBuf],
    attachments: &[PathBuf],
    app: Option<&str>,
    received_at: Option<&str>,
) -> Result<u8> {
    if !attachments.is_empty() && files.len() != 1 {
        anyhow::bail!("--attachment goes with exactly one form FILE");
    }
    let mut files_sent = Vec::with_capacity(attachments.len());
    for a in attachments {
        let name = a
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no file name", a.display()))?;
        let bytes = std::fs::read(a).with_context(|| format!("reading {}", a.display()))?;
        files_sent.push(AttachmentFile { name, bytes });
    }
    let received_at = received_at
        .map(|t| Timestamp::parse_rfc3339(t).context("--received-at"))
        .transpose()?;
    let app = app.map(AppId::new);
    if let Some(a) = &app {
        if !engine.projections().directory().apps.contains_key(a) {
            anyhow::bail!("unknown app {a}");
        }
    }
    // Read every file first: an unreadable file means nothing is appended. A body over the
    // parser's size limit is still stored (rejected as InvalidXml, R50) up to a transport cap,
    // beyond which it is refused unread, as an HTTP server answers 413: storing gigabytes
    // because someone sent them is not "keeping the submission", it is a denial of service.
    let cap = (engine.limits().max_bytes as u64).saturating_mul(TRANSPORT_FACTOR);
    let mut bodies = Vec::with_capacity(files.len());
    for f in files {
        let size = std::fs::metadata(f)
            .with_context(|| format!("reading {}", f.display()))?
            .len();
        if size > cap {
            anyhow::bail!(
                "{} is {size} bytes, over the {cap}-byte transport limit ({TRANSPORT_FACTOR} x max_bytes); nothing was stored",
                f.display()
            );
        }
        bodies.push(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
    }
    let requests = bodies
        .into_iter()
        .map(|raw| {
            let sub =
                engine.prepare_submission_with(raw, app.clone(), std::mem::take(&mut files_sent));
            let mut r = Request::new(Command::SubmitForm(Box::new(sub)));
            r.received_at = received_at;
            r
        })
        .collect();
    let results = engine.execute_many(requests).await?;
    let mut code = 0;
    for (file, result) in files.iter().zip(results) {
        let outcome = SubmitOutcome::from_events(&result?.events)?;
        if outcome.outcome == SubmitStatus::Rejected {
            code = 2;
        }
        print_outcome(cli, &file.display().to_string(), &outcome)?;
    }
    Ok(code)
}

fn print_outcome(cli: &Cli, file: &str, outcome: &SubmitOutcome) -> Result<()> {
    {
        if cli.json {
            out(&json!({
                "file": file,
                "instance_id": outcome.instance_id,
                "outcome": outcome.outcome,
                "error": outcome.error.as_ref().map(|e| json!({"code": e.code.as_str(), "message": e.message})),
                "position": outcome.position.0,
                "cases": outcome.cases,
            }))?;
        } else {
            let detail = match &outcome.error {
                Some(e) => format!("{}: {}", e.code, e.message),
                None => outcome
                    .cases
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            print_line(&format!(
                "{}  {:?}  {}  @{}  {}",
                file, outcome.outcome, outcome.instance_id, outcome.position, detail
            ))?;
        }
    }
    Ok(())
}

pub(crate) fn print_case(c: &caseledger::domain::Case) -> Result<()> {
    let v = view::case_json(c);
    if let Value::Object(map) = v {
        for (k, v) in map {
            let text = match v {
                Value::String(s) => s,
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            print_line(&format!("{k:<12} {text}"))?;
        }
    }
    Ok(())
}

/// `log`: events from `from`, at most `limit`.
fn print_log(
    log: &caseledger::eventlog::SledLog,
    cli: &Cli,
    from: u64,
    limit: usize,
) -> Result<u8> {
    let events: Vec<_> = log
        .iter_from(Position(from))
        .take(limit)
        .collect::<Result<_, _>>()?;
    if cli.json {
        let entries: Vec<_> = events.iter().map(view::log_entry).collect();
        out(&serde_json::to_value(entries)?)?;
    } else {
        for e in events.iter().map(view::log_entry) {
            print_line(&format!(
                "{:>8}  {}  {}/v{}  {}",
                e.position, e.recorded_at, e.kind, e.version, e.summary
            ))?;
        }
    }
    Ok(0)
}

/// `replay --verify`: every difference between the live projections and a rebuild, one per line
/// (kind, id, live vs rebuilt); exit 1 when there is any.
fn verify(engine: &Engine, cli: &Cli) -> Result<u8> {
    let differences = engine
        .verify(&mut |_, _| {})
        .map_err(|e: EngineError| anyhow::anyhow!(e))?;
    if cli.json {
        out(&Value::Array(
            differences
                .iter()
                .map(|d| json!({"kind": d.kind.to_string(), "id": d.id, "live": d.live, "rebuilt": d.rebuilt}))
                .collect(),
        ))?;
    } else {
        for d in &differences {
            print_line(&d.to_string())?;
        }
        print_line(&format!(
            "{} difference(s) between the live projections and a rebuild from the log",
            differences.len()
        ))?;
    }
    Ok(u8::from(!differences.is_empty()))
}

fn replay(engine: &Engine, cli: &Cli) -> Result<u8> {
    let head = engine.log().written_head();
    let bar = indicatif::ProgressBar::new(head.0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} replay [{bar:40}] {pos}/{len} events {per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let stats = engine
        .replay(&mut |done, head| {
            bar.set_position(done.0);
            // The scan is done; the sorted passes that write the projections follow.
            if done >= head {
                bar.set_message("writing projections in key order");
            }
        })
        .map_err(|e: EngineError| anyhow::anyhow!(e))?;
    bar.finish_and_clear();
    let rate = stats.events as f64 / stats.seconds.max(1e-9);
    if cli.json {
        out(&json!({"events": stats.events, "seconds": stats.seconds, "events_per_second": rate}))?;
    } else {
        print_line(&format!(
            "replayed {} events in {:.3}s ({:.0} events/s)",
            stats.events, stats.seconds, rate
        ))?;
    }
    Ok(0)
}
