//! The `caseledger` command line: parse arguments, set up tracing, call the engine, print.
//!
//! Exit status (a contract scripts depend on): 0 when everything went through (duplicates
//! included), 2 when a submission was rejected (it is still stored), 1 for usage, IO or
//! unknown-id errors, a data dir without a store or a store another process holds (nothing
//! appended), 3 when `verify`, `export` or `import` found damage or a modified export.
//! Failures print one line on stderr, JSON with a stable code under `--json` (`fail`,
//! `docs/CLI.md`).
//!
//! One file past 600 lines: the argument definitions and their printing are the CLI contract and
//! read best together; the logic lives in the crates.

// glibc malloc's arena locks and consolidation were the top cost of replay in a profile
// (sled allocates per node and per update); mimalloc roughly halves that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod credentials;
mod datadir;
mod fail;
mod serve;
mod store;
mod submit;
mod table;
mod travel;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use caseledger::domain::{AppId, CaseId, Command, DomainName, FormId, GroupId, Position, UserId};
use caseledger::{view, Engine, EngineConfig, EngineError, Request, SubmitStatus, UpgradeStatus};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::fail::{fail, Code};
use crate::table::Table;

#[derive(Parser, Debug)]
#[command(
    name = "caseledger",
    version,
    about = "Event-sourced CommCare case store with case sharing",
    after_help = "\
Exit status: 0 done (duplicates included), 2 a submission was rejected (it is still stored),
1 usage, IO, unknown id, no store or a store held by another process (nothing appended),
3 damage or a refused export found by verify, export or import.

Examples:
  caseledger --data /tmp/cl user create --id u-maria --username maria
  caseledger --data /tmp/cl --json cases --user u-maria
  CASELEDGER_DATA=/tmp/cl caseledger log --limit 20
  caseledger --store nats://127.0.0.1:5222,127.0.0.1:5223 --data /tmp/replica cases --user u-maria"
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
    /// Where the log is: sled (the store in --data) or nats://HOST:PORT[,HOST:PORT...], a
    /// JetStream cluster, when --data holds only this process's replica and projections.
    #[arg(
        long,
        global = true,
        env = "CASELEDGER_STORE",
        default_value = "sled",
        value_parser = store::parse
    )]
    store: store::Store,
    /// Project space.
    #[arg(long, global = true, default_value = "demo")]
    domain: String,
    /// Print JSON instead of tables; errors become {"error":{"code","message"}} on stderr.
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
    #[command(
        subcommand,
        after_help = "Examples:\n  caseledger user create --id u-maria --username maria"
    )]
    User(UserCmd),
    /// Groups and memberships.
    #[command(
        subcommand,
        after_help = "Examples:\n  caseledger group create --id g-team --name \"Kibera CHW team\" --case-sharing\n  caseledger group add-member g-team u-maria"
    )]
    Group(GroupCmd),
    /// Applications.
    #[command(
        subcommand,
        after_help = "Examples:\n  caseledger app create --id app-anc --name ANC --case-sharing --case-type pregnancy"
    )]
    App(AppCmd),
    /// Submit form XML files, in order (each read whole before the store is opened).
    #[command(after_help = "\
Exit status 2 when a form was rejected (it is still stored). A file over 4 x the parser's size
limit (64 MiB) is refused unread and nothing is stored.

Examples:
  caseledger submit register.xml visit.xml --app app-anc
  caseledger --json submit photo-form.xml --attachment 1741330001001.jpg")]
    Submit {
        /// Form XML files to submit, in this order.
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
    #[command(
        subcommand,
        after_help = "Examples:\n  caseledger case show 3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10\n  caseledger case history 3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10"
    )]
    Case(CaseCmd),
    /// A case list: by user (R44) or by owner.
    #[command(after_help = "\
Examples:
  caseledger cases --user u-maria
  caseledger cases --owner g-team --include-closed
  caseledger cases --user u-maria --as-of 2025-03-07T12:00:00Z")]
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
    #[command(after_help = "\
Examples:
  caseledger groups
  caseledger groups --user u-maria --at 12")]
    Groups {
        /// Only groups listing this user.
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        at: travel::At,
    },
    /// Validation diagnostics (R59–R66).
    #[command(after_help = "\
Examples:
  caseledger diagnostics
  caseledger --json diagnostics --at 40")]
    Diagnostics {
        #[command(flatten)]
        at: travel::At,
    },
    /// Conflicts between offline edits: a block made earlier on the phone that overwrote a
    /// value another form set later on its phone (base, theirs, mine, result).
    #[command(after_help = "\
Examples:
  caseledger conflicts --user u-david
  caseledger conflicts show 9c1e4b0a7f23")]
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
    #[command(after_help = "\
Examples:
  caseledger log --from 1 --limit 20
  caseledger --json log --from 120 | jq '.[].type'")]
    Log {
        /// First position.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Rebuild every projection from the log and swap it in.
    #[command(after_help = "\
Examples:
  caseledger replay
  caseledger replay --verify")]
    Replay {
        /// Rebuild beside the live projections, report every key where they differ (exit 1 if
        /// any), and swap nothing.
        #[arg(long)]
        verify: bool,
    },
    /// Check every envelope and the hash chain from a position; print the head and its hash
    /// (exit 3 naming the first bad position).
    #[command(after_help = "\
Examples:
  caseledger verify
  caseledger --json verify --from 1000")]
    Verify {
        /// First position to check (its stored previous hash is taken on trust).
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
    /// Export the log as JSON lines, one per event, with hashes and raw submissions.
    #[command(after_help = "\
Examples:
  caseledger export --format jsonl > log.jsonl
  caseledger export --from 100 --to 200 > part.jsonl")]
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
    #[command(after_help = "\
Examples:
  caseledger --data /tmp/restored import log.jsonl
  caseledger --data /tmp/restored import log.jsonl --head 5d41402abc4b2a76b9719d911017c592ae2bd1c0b2f2f5ed7b0c1ab0c6a2f1e3")]
    Import {
        /// The export (JSON lines).
        file: PathBuf,
        /// Refuse unless the export ends at this head hash (hex), e.g. a published one.
        #[arg(long)]
        head: Option<String>,
    },
    /// Archive or unarchive a form (R57).
    #[command(
        subcommand,
        after_help = "Examples:\n  caseledger form archive 3d307d25-cc07-51c3-bfcb-fcd7d6a6807c"
    )]
    Form(FormCmd),
    /// Re-decide a stored rejected form after its cause was fixed (R56).
    #[command(after_help = "\
Examples:
  caseledger reprocess 3d307d25-cc07-51c3-bfcb-fcd7d6a6807c")]
    Reprocess {
        /// The form's instanceID.
        form_id: String,
    },
    /// Print the OpenRosa restore XML a phone of this user would receive (R45–R48).
    #[command(after_help = "\
Examples:
  caseledger restore --user u-maria > restore.xml
  caseledger --json restore --user u-maria --since 42-5b0f2a9c8e7d4c1b9a6f3e2d1c0b9a8f")]
    Restore {
        /// The mobile worker.
        #[arg(long)]
        user: String,
        /// Sync token of an earlier restore: only what changed after it.
        #[arg(long)]
        since: Option<String>,
    },
    /// Run the seed's case-sharing stories in a fresh data dir and show what each user sees
    /// (sled only: not with --store nats://).
    #[command(after_help = "\
Examples:
  caseledger demo
  caseledger --data /tmp/cl demo")]
    Demo,
    /// API keys for services and auditors (the server's `Authorization: ApiKey user:key`).
    #[command(
        subcommand,
        after_help = "\
Examples:
  caseledger apikey create --user u-audit --role auditor
  caseledger apikey list
  caseledger apikey revoke 3f2a9c0d1e4b5a67"
    )]
    Apikey(credentials::ApiKeyCmd),
    /// Serve the CommCare phone routes over HTTP until SIGTERM or SIGINT (docs/API.md).
    #[command(after_help = "\
Examples:
  caseledger serve --addr 127.0.0.1:8000
  caseledger --data /srv/caseledger serve --addr 0.0.0.0:8443")]
    Serve(serve::ServeArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ExportFormat {
    Jsonl,
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Create a mobile worker.
    #[command(after_help = "\
Examples:
  caseledger user create --id u-maria --username maria")]
    Create {
        /// The user id that forms name in their meta (`userID`).
        #[arg(long)]
        id: String,
        /// The login name.
        #[arg(long)]
        username: String,
        #[command(flatten)]
        password: credentials::PasswordArgs,
    },
    /// Set or replace a mobile worker's password (only its argon2id hash is recorded).
    #[command(after_help = "\
Examples:
  caseledger user set-password u-maria --password-stdin < password.txt")]
    SetPassword(credentials::SetPasswordArgs),
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Create a group.
    #[command(after_help = "\
Examples:
  caseledger group create --id g-team --name \"Kibera CHW team\" --case-sharing")]
    Create {
        /// The group id (a case owner id when case sharing is on).
        #[arg(long)]
        id: String,
        /// The display name.
        #[arg(long)]
        name: String,
        /// Members see the cases the group owns (R35).
        #[arg(long)]
        case_sharing: bool,
    },
    /// Turn a group's case sharing on or off.
    #[command(after_help = "\
Examples:
  caseledger group set-case-sharing g-team off")]
    SetCaseSharing {
        /// The group id.
        group: String,
        /// `on` or `off`.
        state: OnOff,
    },
    /// Add a user to a group.
    #[command(after_help = "\
Examples:
  caseledger group add-member g-team u-maria")]
    AddMember {
        /// The group id.
        group: String,
        /// The user id.
        user: String,
    },
    /// Remove a user from a group.
    #[command(after_help = "\
Examples:
  caseledger group remove-member g-team u-maria")]
    RemoveMember {
        /// The group id.
        group: String,
        /// The user id.
        user: String,
    },
}

#[derive(Subcommand, Debug)]
enum AppCmd {
    /// Create an app.
    #[command(after_help = "\
Examples:
  caseledger app create --id app-anc --name ANC --case-sharing --case-type pregnancy")]
    Create {
        /// The app id, which `submit --app` names.
        #[arg(long)]
        id: String,
        /// The display name.
        #[arg(long)]
        name: String,
        /// Forms through this app use case sharing (R36).
        #[arg(long)]
        case_sharing: bool,
        /// A case type its case lists show (repeat the flag).
        #[arg(long = "case-type")]
        case_types: Vec<String>,
    },
    /// Turn an app's case sharing on or off.
    #[command(after_help = "\
Examples:
  caseledger app set-case-sharing app-anc on")]
    SetCaseSharing {
        /// The app id.
        app: String,
        /// `on` or `off`.
        state: OnOff,
    },
}

#[derive(Subcommand, Debug)]
enum FormCmd {
    /// Revoke a form's case effects; affected cases are rebuilt without it.
    #[command(after_help = "\
Examples:
  caseledger form archive 3d307d25-cc07-51c3-bfcb-fcd7d6a6807c")]
    Archive {
        /// The form's instanceID.
        form_id: String,
    },
    /// Restore an archived form's case effects at its original position.
    #[command(after_help = "\
Examples:
  caseledger form unarchive 3d307d25-cc07-51c3-bfcb-fcd7d6a6807c")]
    Unarchive {
        /// The form's instanceID.
        form_id: String,
    },
}

#[derive(Subcommand, Debug)]
enum CaseCmd {
    /// Show one case (as of now, or `--at`/`--as-of` a point of the log).
    #[command(after_help = "\
Examples:
  caseledger case show 3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10
  caseledger --json case show 3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10 --at 12")]
    Show {
        /// The case id.
        case_id: String,
        #[command(flatten)]
        at: travel::At,
    },
    /// Every change to a case, oldest first, with the forms that caused them.
    #[command(after_help = "\
Examples:
  caseledger case history 3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10")]
    History {
        /// The case id.
        case_id: String,
    },
    /// The users whose case list held the case, and since which position.
    #[command(after_help = "\
Examples:
  caseledger case who-could-see 3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10
  caseledger case who-could-see 3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10 --as-of 2025-03-07T12:00:00Z")]
    WhoCouldSee {
        /// The case id.
        case_id: String,
        #[command(flatten)]
        at: travel::At,
    },
}

#[derive(Subcommand, Debug)]
enum ConflictsCmd {
    /// One conflict, three-way, with the positions to time-travel to.
    #[command(after_help = "\
Examples:
  caseledger conflicts show 9c1e4b0a7f23")]
    Show {
        /// The conflict id, as `conflicts` lists it.
        id: String,
    },
}

impl Cmd {
    /// Whether the command may create the store (it writes, or builds a fresh one); every other
    /// command needs an existing store and fails with `no_store` rather than create an empty one.
    fn may_create_store(&self) -> bool {
        match self {
            Cmd::User(UserCmd::Create { .. })
            | Cmd::Group(GroupCmd::Create { .. })
            | Cmd::App(AppCmd::Create { .. })
            | Cmd::Submit { .. }
            | Cmd::Import { .. }
            | Cmd::Demo => true,
            Cmd::Group(_)
            | Cmd::App(_)
            | Cmd::Case(_)
            | Cmd::Cases { .. }
            | Cmd::Groups { .. }
            | Cmd::Diagnostics { .. }
            | Cmd::Conflicts { .. }
            | Cmd::Log { .. }
            | Cmd::Replay { .. }
            | Cmd::Verify { .. }
            | Cmd::Export { .. }
            | Cmd::Form(_)
            | Cmd::Reprocess { .. }
            | Cmd::Restore { .. }
            | Cmd::User(_)
            | Cmd::Apikey(_)
            | Cmd::Serve(_) => false,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: printed on stdout; a closed pipe is not a failure.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Parsing failed, so whether --json was given is read from the raw arguments.
            let json = std::env::args_os()
                .take_while(|a| a != "--")
                .any(|a| a == "--json");
            if json {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                let message = first.strip_prefix("error: ").unwrap_or(first);
                fail::Failure {
                    code: fail::Code::Usage,
                    message: message.to_owned(),
                    exit: 1,
                }
                .report(true);
            } else {
                let _ = e.print();
            }
            return ExitCode::from(1);
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
            let e = anyhow::Error::new(e).context("cannot start the runtime");
            return report(&e, cli.json);
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => report(&e, json),
    }
}

/// Reports a failure on stderr (JSON under `--json`) and gives its exit status; a closed stdout
/// ends quietly with status 0.
fn report(e: &anyhow::Error, json: bool) -> ExitCode {
    match fail::Failure::of(e) {
        Some(f) => {
            f.report(json);
            ExitCode::from(f.exit)
        }
        None => ExitCode::SUCCESS,
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
    let domain = DomainName::from(cli.domain.as_str());
    // On a JetStream cluster the data dir holds this process's replica: the same commands run
    // on it once it has pulled what the stream holds.
    let cluster = cli.store.jetstream();
    if cluster.is_some() && matches!(cli.command, Cmd::Demo) {
        return Err(fail(
            Code::Usage,
            "demo runs in a fresh sled data dir only; drop --store (or unset \
             $CASELEDGER_STORE)",
        ));
    }
    if !cli.command.may_create_store() {
        match &cluster {
            None => datadir::require_store(&cli.data)?,
            // The server serves every project space of the cluster: no one stream to require.
            Some(_) if matches!(cli.command, Cmd::Serve(_)) => {}
            Some(cluster) => store::require_stream(cluster, &domain).await?,
        }
    }
    if let Cmd::Serve(args) = &cli.command {
        if cluster.is_some() {
            store::data_dir(&cli.data)?;
        }
        datadir::require_free(&cli.data)?;
        return serve::run(&cli.data, args, cluster);
    }
    if let Cmd::Demo = cli.command {
        return caseledger::demo::run(&cli.data).await.map(|()| 0);
    }
    let config = EngineConfig::default();
    // Inputs are read whole, with a bound, before the store is opened: a slow or endless input
    // (a FIFO without a writer, /dev/zero) never holds the store's lock.
    let inputs = match &cli.command {
        Cmd::Submit {
            files, attachments, ..
        } => Some(submit::read_inputs(files, attachments, &config)?),
        _ => None,
    };
    if !matches!(cli.command, Cmd::Import { .. }) {
        datadir::require_free(&cli.data)?;
    }
    let audits = matches!(
        cli.command,
        Cmd::Verify { .. } | Cmd::Export { .. } | Cmd::Import { .. }
    );
    let engine = match &cluster {
        None => {
            if audits {
                return audit(&cli, None).await;
            }
            // The log alone: nothing derived from it (projections) can keep anyone from reading it.
            if let Cmd::Log { from, limit } = cli.command {
                let log =
                    Engine::open_log(&cli.data, &domain, &config).map_err(|e| opening(&cli, e))?;
                return print_log(&log, &cli, from, limit);
            }
            Engine::open(&cli.data, &domain, config).map_err(|e| opening(&cli, e))?
        }
        Some(cluster) => {
            let upstream = store::connect(cluster, &domain).await?;
            store::data_dir(&cli.data)?;
            if audits {
                return audit(&cli, Some((&upstream, config))).await;
            }
            open_replica(&cli, &upstream, config)
                .await
                .map_err(|e| opening(&cli, e))?
        }
    };
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
    let result = match inputs {
        Some(inputs) => submit::submit(&engine, &cli, inputs).await,
        None => dispatch(&engine, &cli).await,
    };
    // Damaged projections were rebuilt from the log (on open or by a query); say so.
    for d in engine.repaired() {
        eprintln!("warning: damaged projections rebuilt from the log: {d}");
    }
    let code = result?;
    engine.flush()?;
    Ok(code)
}

/// Opens the replica of `upstream` in the data dir (which must exist: [`store::data_dir`]); it
/// pulls what the stream holds before it returns.
async fn open_replica(
    cli: &Cli,
    upstream: &Arc<jetstream::JetStreamLog>,
    config: EngineConfig,
) -> Result<Engine, EngineError> {
    let store: Arc<dyn caseledger::eventlog::EventStore> = upstream.clone();
    Engine::open_replica(&cli.data, &cli.domain.as_str().into(), config, store).await
}

/// An error opening the store: a lock taken since the probe names its holder too.
fn opening(cli: &Cli, e: EngineError) -> anyhow::Error {
    match e {
        EngineError::Locked { .. } => datadir::held(&cli.data),
        e => anyhow::Error::new(e).context(format!("opening {}", cli.data.display())),
    }
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
                None => Err(fail(Code::NotFound, format!("no case {case_id}"))),
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
                        return Err(fail(
                            Code::NotFound,
                            format!(
                                "unknown user {} at that point",
                                user.as_deref().unwrap_or("")
                            ),
                        ))
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
                            return Err(fail(Code::NotFound, format!("unknown user {u}")));
                        }
                        engine.query(|p| p.cases_for_user(u, *include_closed))?
                    }
                    (None, Some(o)) => engine.query(|p| p.cases_by_owner(o, *include_closed))?,
                    (None, None) => return Err(fail(Code::Usage, "give --user or --owner")),
                }
            };
            if cli.json {
                out(&Value::Array(cases.iter().map(view::case_json).collect()))?;
            } else {
                let mut table = Table::new(&["CASE_ID", "TYPE", "NAME", "OWNER", "USER", "STATUS"]);
                for c in &cases {
                    table.row(vec![
                        c.case_id.to_string(),
                        c.case_type.clone(),
                        c.case_name.clone(),
                        c.owner_id.to_string(),
                        c.user_id.to_string(),
                        (if c.closed { "closed" } else { "open" }).to_owned(),
                    ]);
                }
                table.print()?;
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
                let mut table = Table::new(&["GROUP", "NAME", "SHARING", "MEMBERS"]);
                for g in &groups {
                    table.row(vec![
                        g.id.to_string(),
                        g.name.clone(),
                        (if g.case_sharing { "on" } else { "off" }).to_owned(),
                        g.members.join(", "),
                    ]);
                }
                table.print()?;
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
                let mut table = Table::new(&["POSITION", "CODE", "SUBJECT", "DETAIL"]).right(0);
                for d in &rows {
                    table.row(vec![
                        d.position.to_string(),
                        d.diagnostic.code.to_string(),
                        d.diagnostic.subject.to_string(),
                        d.diagnostic.detail.to_string(),
                    ]);
                }
                table.print()?;
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
            submit::print_outcomes(cli.json, &[(form_id.clone(), outcome.clone())])?;
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
        // Handled by `run` before the engine is opened.
        Cmd::Submit { .. }
        | Cmd::Demo
        | Cmd::Serve(_)
        | Cmd::Verify { .. }
        | Cmd::Export { .. }
        | Cmd::Import { .. } => Ok(0),
    }
}

/// `verify`, `export`, `import`: on the log alone, without opening the engine; on a JetStream
/// cluster (`upstream`), on the replica after it pulled, `verify` checking the stream too
/// (exit 3: damage or a refused export).
async fn audit(
    cli: &Cli,
    upstream: Option<(&Arc<jetstream::JetStreamLog>, EngineConfig)>,
) -> Result<u8> {
    use caseledger::audit::{self, AuditError};
    use caseledger::eventlog::chain::to_hex;
    enum Done {
        /// The log's report, and on a cluster the stream's name and report.
        Verified(
            audit::VerifyReport,
            Option<(String, caseledger::eventlog::Verified)>,
        ),
        Exported,
        Imported(audit::ImportReport),
    }
    let domain = cli.domain.as_str().into();
    let result: Result<Done> = match (&cli.command, upstream) {
        (Cmd::Verify { from }, None) => audit::verify(&cli.data, &domain, Position(*from))
            .map(|r| Done::Verified(r, None))
            .map_err(Into::into),
        (Cmd::Verify { from }, Some((up, config))) => {
            verify_replica(cli, up, config, Position(*from))
                .await
                .map(|(r, stream)| Done::Verified(r, Some(stream)))
        }
        (
            Cmd::Export {
                format: ExportFormat::Jsonl,
                from,
                to,
            },
            up,
        ) => {
            let from = Position(*from);
            let to = to.map(Position);
            match up {
                None => {
                    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
                    audit::export(&cli.data, &domain, from, to, &mut stdout)
                        .map(|_| Done::Exported)
                        .map_err(Into::into)
                }
                Some((up, config)) => match open_audited(cli, up, config).await {
                    Ok(engine) => {
                        let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
                        let exported = audit::export_log(engine.log(), from, to, &mut stdout);
                        drop(stdout);
                        exported
                            .map_err(anyhow::Error::from)
                            .and_then(|_| Ok(engine.flush()?))
                            .map(|()| Done::Exported)
                    }
                    Err(e) => Err(e),
                },
            }
        }
        (Cmd::Import { file, head }, None) => {
            let head = expected_head(head.as_deref())?;
            audit::import(file, &cli.data, &domain, head)
                .map(Done::Imported)
                .map_err(Into::into)
        }
        (Cmd::Import { file, head }, Some((up, config))) => {
            let head = expected_head(head.as_deref())?;
            match audit::import_into_stream(file, up, head).await {
                // The replica copies and folds what was imported.
                Ok(report) => match open_audited(cli, up, config).await {
                    Ok(engine) => engine
                        .flush()
                        .map(|()| Done::Imported(report))
                        .map_err(Into::into),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e.into()),
            }
        }
        _ => Ok(Done::Exported),
    };
    match result {
        Ok(Done::Verified(r, stream)) if cli.json => {
            let mut value = r.to_json();
            if let (Some((name, s)), Some(fields)) = (stream, value.as_object_mut()) {
                fields.insert(
                    "stream".into(),
                    json!({
                        "name": name,
                        "head": s.head.0,
                        "head_hash": to_hex(&s.head_hash),
                        "entries": s.entries,
                        "bytes": s.bytes,
                    }),
                );
            }
            out(&value)?;
        }
        Ok(Done::Verified(r, stream)) => {
            let v = &r.verified;
            print_line(&format!(
                "ok: {} entries checked from position {} ({} unchained)",
                v.entries, v.from, v.unchained
            ))?;
            print_line(&format!("head {} {}", v.head, to_hex(&v.head_hash)))?;
            if let Some(a) = r.acknowledged {
                print_line(&format!("acknowledged {} {}", a.position, to_hex(&a.hash)))?;
            }
            if let Some((name, s)) = stream {
                print_line(&format!(
                    "stream {name}: {} entries checked; head {} {}",
                    s.entries,
                    s.head,
                    to_hex(&s.head_hash)
                ))?;
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
        Err(e) => {
            let damage = e.downcast_ref::<AuditError>().filter(|a| a.is_damage());
            if let (Some(a), true) = (
                damage,
                cli.json && matches!(cli.command, Cmd::Verify { .. }),
            ) {
                let position = match a {
                    AuditError::Damaged { position, .. } => Some(*position),
                    _ => None,
                };
                out(&json!({"ok": false, "position": position, "error": a.to_string()}))?;
            }
            // Exit 3 for damage (`fail` knows audit errors).
            return Err(e);
        }
    }
    Ok(0)
}

/// `verify` on a JetStream cluster: the stream first (its damage is verify's damage, and the
/// replica pulled after it holds at least its head), then the replica, which must hold the
/// stream's head with the same hash.
async fn verify_replica(
    cli: &Cli,
    upstream: &Arc<jetstream::JetStreamLog>,
    config: EngineConfig,
    from: Position,
) -> Result<(
    caseledger::audit::VerifyReport,
    (String, caseledger::eventlog::Verified),
)> {
    use caseledger::audit::{self, AuditError};
    let stream = upstream.verify().await.map_err(AuditError::from)?;
    let engine = open_audited(cli, upstream, config).await?;
    let report = audit::verify_replica(engine.log(), from, &stream)?;
    engine.flush()?;
    Ok((report, (upstream.stream_name().to_owned(), stream)))
}

/// `import --head`: the head hash an import must end on, if given.
fn expected_head(head: Option<&str>) -> anyhow::Result<Option<caseledger::eventlog::Hash>> {
    head.map(|h| {
        caseledger::audit::parse_head(h)
            .ok_or_else(|| fail(Code::InvalidInput, "--head wants 64 hex digits"))
    })
    .transpose()
}

/// [`open_replica`] for `verify` and `export`: a replica that does not chain, or is not a copy of
/// the stream, is damage they report (exit 3).
async fn open_audited(
    cli: &Cli,
    upstream: &Arc<jetstream::JetStreamLog>,
    config: EngineConfig,
) -> Result<Engine> {
    use caseledger::eventlog::LogError;
    match open_replica(cli, upstream, config).await {
        Ok(engine) => Ok(engine),
        Err(EngineError::Log(
            e @ (LogError::Corrupt { .. } | LogError::UnsupportedEnvelope { .. }),
        )) => Err(anyhow::Error::new(caseledger::audit::AuditError::from(e))
            .context(format!("opening the replica in {}", cli.data.display()))),
        Err(e) => Err(opening(cli, e)),
    }
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
        let mut table = Table::new(&["POSITION", "RECORDED_AT", "TYPE", "SUMMARY"]).right(0);
        for e in events.iter().map(view::log_entry) {
            table.row(vec![
                e.position.to_string(),
                e.recorded_at,
                format!("{}/v{}", e.kind, e.version),
                e.summary,
            ]);
        }
        table.print()?;
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
    // The new generation answers now; the retired one is deleted in the background, and this
    // command ends once it is gone rather than leave it to the next command's open.
    let started = std::time::Instant::now();
    let spinner = indicatif::ProgressBar::new_spinner();
    if !cli.json {
        print_line(&format!(
            "replayed {} events in {:.3}s ({:.0} events/s)",
            stats.events, stats.seconds, rate
        ))?;
        spinner.set_message("deleting the retired projections");
        spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    }
    engine.projections().wait_reclaimed();
    spinner.finish_and_clear();
    let reclaim_seconds = started.elapsed().as_secs_f64();
    if cli.json {
        out(&json!({
            "events": stats.events,
            "seconds": stats.seconds,
            "events_per_second": rate,
            "reclaim_seconds": reclaim_seconds
        }))?;
    } else {
        print_line(&format!(
            "retired projections deleted in {reclaim_seconds:.3}s"
        ))?;
    }
    Ok(0)
}
