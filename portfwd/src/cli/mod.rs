//! The `portfwd` command line: argument parsing (clap) and one function per
//! command in `commands`, which prints what the operations in `ops` did.

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};

use crate::{
    error, holder, instance,
    model::rootless::{MapRequest, Request},
    ops, serve,
};

mod api;
mod commands;
mod conntrack;
mod explain;
mod list;
mod trace;

#[derive(Parser)]
#[command(
    name = "portfwd",
    version,
    about = "Publish container ports with eBPF: no iptables rules, no proxy process"
)]
struct Cli {
    /// Directory under a bpf filesystem where portfwd pins its maps and links
    #[arg(long, global = true, value_name = "DIR", env = "PORTFWD_BPFFS", default_value = instance::DEFAULT_PIN_DIR)]
    bpffs: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the programs and pin them (keeps existing mappings)
    Up {
        /// Uplink interface for external traffic (repeatable) [default: the interfaces of the default routes]
        #[arg(long = "iface", value_name = "IF")]
        ifaces: Vec<String>,
        /// cgroup v2 directory to attach the socket programs to [default: the cgroup2 mount]
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
        /// Replace the attached programs even if they are this build's
        #[arg(long)]
        reload: bool,
        /// Capacity of the mappings map, when it is created [default: 65536]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max_mappings: Option<u32>,
        /// Capacity of connection tracking, in flows, when it is created [default: 262144]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max_flows: Option<u32>,
    },
    /// Detach the programs and remove every pin and mapping
    Down {
        /// Keep the state file, so that the next `up` restores the mappings
        #[arg(long)]
        keep_state: bool,
    },
    /// Replace the whole set of mappings with a file's (TOML or JSON)
    Apply {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Only print what would change
        #[arg(long)]
        dry_run: bool,
    },
    /// Forward external traffic arriving on an interface (an uplink)
    Attach {
        #[arg(value_name = "IF")]
        iface: String,
    },
    /// Stop forwarding external traffic of an interface (mappings stay)
    Detach {
        #[arg(value_name = "IF")]
        iface: String,
    },
    /// Publish container ports: PUBLISH is docker's -p syntax, e.g. 8080:80, 127.0.0.1:8080:80/udp, 80
    #[command(
        override_usage = "portfwd map [OPTIONS] CONTAINER_IP PUBLISH...\n       portfwd map --netns PID|PATH [OPTIONS] PUBLISH..."
    )]
    Map(MapArgs),
    /// Remove mappings by name or by host port: [HOSTIP:]HOSTPORT[-END][/PROTO]
    Unmap {
        #[arg(long)]
        name: Option<String>,
        #[arg(value_name = "HOSTPORT")]
        selectors: Vec<String>,
    },
    /// Show every mapping
    List {
        #[arg(long)]
        json: bool,
    },
    /// The TC path's tracked flows: list them, or end those of some mappings
    Conntrack {
        #[command(subcommand)]
        command: ConntrackCommand,
    },
    /// Explain what happens to a connection to HOST:PORT[/PROTO] (exit 1: not served)
    Explain {
        /// e.g. 127.0.0.1:8080, [::1]:53/udp, 192.168.1.10:443/tcp
        #[arg(value_name = "HOST:PORT[/PROTO]")]
        target: String,
        /// The client's address (a host address or loopback: a process on this host)
        #[arg(long, value_name = "CLIENT_IP")]
        from: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stream what the TC programs decide: new flows, drops, packets passed untranslated
    Trace(TraceArgs),
    /// Run as the host's portfwd service: keep the port holder running
    /// (restarting it when it dies) and serve Prometheus metrics
    Serve(ServeArgs),
    /// Print a shell completion script, e.g.
    /// `portfwd completions bash > /etc/bash_completion.d/portfwd`
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (portfwd.1, portfwd-map.1, ...) into a directory,
    /// e.g. `portfwd man /usr/local/share/man/man1`
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// The state file (the record of every mapping, restored by `up`)
    State {
        #[command(subcommand)]
        action: StateAction,
    },
    /// The port holder process (started by `up`, stopped by `down`)
    #[command(hide = true)]
    Hold,
}

#[derive(clap::Args)]
struct MapArgs {
    /// Name of the mapping [default: the container address]
    #[arg(long)]
    name: Option<String>,
    /// Publish ports of this network namespace (a pid of a process in it,
    /// or a namespace file such as RootlessKit's --detach-netns) through
    /// `portfwd serve`: how a user who is not root publishes
    #[arg(long, value_name = "PID|PATH", conflicts_with = "force")]
    netns: Option<String>,
    /// CONTAINER_IP (without --netns), then each PUBLISH:
    /// [[HOSTIP:]HOSTPORT[-END]:]CONTAINERPORT[-END][/tcp|/udp]
    #[arg(value_name = "ARGS", required = true)]
    args: Vec<String>,
    /// Publish even a host port that another process holds
    #[arg(long)]
    force: bool,
    /// Only these clients may connect: CIDR[,CIDR...], and `host` for this
    /// machine's own processes (repeatable) [default: everyone]
    #[arg(long, value_name = "CIDR")]
    allow: Vec<String>,
    /// What a client outside --allow gets: `reject` (what a closed port
    /// gives: a TCP reset, an ICMP port unreachable) or `drop` (nothing)
    #[arg(long, value_name = "reject|drop", requires = "allow")]
    refuse: Option<crate::model::Refuse>,
}

#[derive(clap::Args)]
struct TraceArgs {
    /// Only packets from or to this port
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// Only this protocol (tcp or udp)
    #[arg(long, value_name = "PROTO")]
    proto: Option<crate::model::Protocol>,
    /// Only drops and packets passed untranslated
    #[arg(long)]
    drops: bool,
    /// One JSON object per line
    #[arg(long)]
    json: bool,
    /// Stop after N events
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Stop after this many seconds
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Serve metrics on http://ADDR/metrics (loopback by default; `none` to turn off)
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_METRICS, value_parser = parse_metrics_addr)]
    metrics: MetricsAddr,
    /// Turn on the kernel's per-program run-time statistics while serving
    /// (portfwd_program_run_seconds; each program run costs two clock reads more)
    #[arg(long)]
    program_stats: bool,
    /// The API socket, open to every user [default: /run/portfwd/api<instance>.sock]; `none` to turn it off
    #[arg(long, value_name = "PATH")]
    api: Option<PathBuf>,
    /// The rootless policy: who may publish what through the API (no file: nobody but root)
    #[arg(long, value_name = "FILE", default_value = instance::DEFAULT_ROOTLESS_POLICY)]
    rootless_policy: PathBuf,
}

#[derive(Subcommand)]
enum ConntrackCommand {
    /// Show the live flows (client -> published address -> container)
    List {
        /// Only the flows of mappings on this host port
        #[arg(long, value_name = "N")]
        port: Option<u16>,
        #[arg(long)]
        json: bool,
    },
    /// End flows now: those of mappings on a host port, of a name, or all
    Flush {
        /// Only the flows of mappings on this host port
        #[arg(long, value_name = "N", conflicts_with = "name")]
        port: Option<u16>,
        /// Only the flows of the mappings with this name
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum StateAction {
    /// Rewrite the state file from the kernel's maps (a damaged file is kept as .damaged-TIME)
    Rebuild,
}

/// The `portfwd` command line.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(error),
    };
    match run(cli.bpffs, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("portfwd: {error:#}");
            ExitCode::from(error::exit_status(&error))
        }
    }
}

/// Runs one command on the instance pinned at `pin_dir`.
fn run(pin_dir: PathBuf, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up {
            ifaces,
            cgroup,
            reload,
            max_mappings,
            max_flows,
        } => commands::up(&ops::UpOptions {
            pin_dir,
            cgroup,
            ifaces,
            reload,
            max_mappings,
            max_flows,
        }),
        Command::Down { keep_state } => commands::down(&pin_dir, keep_state),
        Command::Apply { file, dry_run } => commands::apply(&pin_dir, &file, dry_run),
        Command::Attach { iface } => commands::attach(&pin_dir, &iface),
        Command::Detach { iface } => commands::detach(&pin_dir, &iface),
        Command::Map(args) => run_map(&pin_dir, args),
        Command::Unmap { name, selectors } if api::serves_this_user(&pin_dir) => {
            api::call(&pin_dir, &Request::Unmap { name, selectors })
        }
        Command::List { json } if api::serves_this_user(&pin_dir) => {
            api::call(&pin_dir, &Request::List { json })
        }
        Command::Hold => holder::run(&pin_dir),
        Command::Unmap { name, selectors } => {
            commands::unmap(&pin_dir, name.as_deref(), &selectors)
        }
        Command::List { json } => commands::list(&pin_dir, json),
        Command::Conntrack { command } => run_conntrack(&pin_dir, command),
        Command::Trace(args) => run_trace(&pin_dir, args),
        Command::Explain { target, from, json } => {
            explain::explain(&pin_dir, &target, from.as_deref(), json)
        }
        Command::Serve(args) => run_serve(pin_dir, args),
        Command::Completions { shell } => print_completions(shell),
        Command::Man { dir } => write_man_pages(&dir),
        Command::State {
            action: StateAction::Rebuild,
        } => commands::rebuild_state(&pin_dir),
    }
}

/// `map --netns` goes to the service (how a user who is not root
/// publishes); without it, root publishes a container address directly.
fn run_map(pin_dir: &std::path::Path, args: MapArgs) -> anyhow::Result<()> {
    let MapArgs {
        name,
        netns,
        args,
        force,
        allow,
        refuse,
    } = args;
    if let Some(netns) = netns {
        let publish = args;
        return api::call(
            pin_dir,
            &Request::Map(MapRequest {
                netns,
                name,
                publish,
                allow,
                refuse,
            }),
        );
    }
    if !api::is_root() {
        return Err(error::Error::usage(
            "as a user who is not root, publish a port of your own namespace: portfwd map --netns PID|PATH PUBLISH...",
        )
        .into());
    }
    match args.split_first() {
        Some((container_ip, publish)) if !publish.is_empty() => commands::map(
            pin_dir,
            name.as_deref(),
            container_ip,
            publish,
            force,
            (&allow, refuse.unwrap_or_default()),
        ),
        _ => Err(error::Error::usage("map needs CONTAINER_IP and at least one PUBLISH").into()),
    }
}

fn run_conntrack(pin_dir: &std::path::Path, command: ConntrackCommand) -> anyhow::Result<()> {
    match command {
        ConntrackCommand::List { port, json } => {
            let filter = ops::FlowFilter { port, name: None };
            conntrack::list(pin_dir, &filter, json)
        }
        ConntrackCommand::Flush { port, name } => {
            conntrack::flush(pin_dir, &ops::FlowFilter { port, name })
        }
    }
}

fn run_trace(pin_dir: &std::path::Path, args: TraceArgs) -> anyhow::Result<()> {
    trace::trace(
        pin_dir,
        &trace::TraceOptions {
            filter: crate::datapath::TraceFilter {
                port: args.port,
                protocol: args.proto,
                drops_only: args.drops,
            },
            json: args.json,
            count: args.count,
            duration: args.duration.map(std::time::Duration::from_secs),
        },
    )
}

fn run_serve(pin_dir: PathBuf, args: ServeArgs) -> anyhow::Result<()> {
    let api = match args.api {
        Some(path) if path.as_os_str() == "none" => None,
        path => Some(serve::ApiOptions {
            socket: path.unwrap_or_else(|| instance::api_socket(&pin_dir)),
            policy: args.rootless_policy,
        }),
    };
    serve::run(serve::ServeOptions {
        pin_dir,
        metrics: args.metrics.0,
        program_stats: args.program_stats,
        api,
    })
}

/// Prometheus' default port range has no portfwd entry yet; 9469 is free in
/// its list of exporters' ports.
const DEFAULT_METRICS: &str = "127.0.0.1:9469";

#[derive(Clone, Copy)]
struct MetricsAddr(Option<std::net::SocketAddr>);

fn parse_metrics_addr(text: &str) -> Result<MetricsAddr, String> {
    if text == "none" {
        return Ok(MetricsAddr(None));
    }
    text.parse()
        .map(|addr| MetricsAddr(Some(addr)))
        .map_err(|_| {
            format!("{text:?} is not an address:port (e.g. 127.0.0.1:9469, [::1]:9469) or `none`")
        })
}

/// Completions and the manual pages come from the same clap definitions as
/// the parser, so they cannot drift from it.
fn print_completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "portfwd", &mut script);
    match std::io::stdout().write_all(&script) {
        // `portfwd completions bash | head` is not a failure.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => Ok(result?),
    }
}

fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
    println!(
        "wrote portfwd.1 and one page per command into {}",
        dir.display()
    );
    Ok(())
}

/// Prints a command-line error on one line (help and version as clap
/// renders them) and returns clap's exit status (2 for usage errors).
fn usage_error(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) || matches!(
        error.kind(),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        // Nothing useful is left to do when stdout is gone.
        error.print().ok();
        return ExitCode::from(error.exit_code() as u8);
    }
    let rendered = error.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    eprintln!("portfwd: {message} (see `portfwd --help`)");
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn visible_commands() -> Vec<String> {
        Cli::command()
            .get_subcommands()
            .filter(|command| !command.is_hide_set())
            .map(|command| command.get_name().to_owned())
            .collect()
    }

    #[test]
    fn every_shell_completes_every_visible_command() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "portfwd", &mut script);
            let script = String::from_utf8(script).unwrap();
            for command in visible_commands() {
                assert!(script.contains(&command), "{shell}: no `{command}`");
            }
        }
    }

    #[test]
    fn the_manual_has_a_page_per_visible_command() {
        let dir = std::env::temp_dir().join(format!("portfwd-man-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_man_pages(&dir).unwrap();
        let main_page = std::fs::read_to_string(dir.join("portfwd.1")).unwrap();
        for command in visible_commands() {
            let page = dir.join(format!("portfwd-{command}.1"));
            assert!(page.is_file(), "no {}", page.display());
            assert!(main_page.contains(&format!("portfwd\\-{command}(1)")));
        }
        assert!(!dir.join("portfwd-hold.1").exists());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            write_man_pages(&dir).is_err(),
            "a missing directory is an error"
        );
    }
}
