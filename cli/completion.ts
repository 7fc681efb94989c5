/** Shell completion scripts for bash and zsh, generated from the command tree. */
import { childrenOf, globalFlags, type CommandSpec } from "./args.js";

function flagWords<C>(command: CommandSpec<C> | undefined): string[] {
  const flags = { ...globalFlags, ...(command?.flags ?? {}) };
  return Object.keys(flags).map((f) => `--${f}`);
}

/** A bash completion script (zsh uses it through bashcompinit). */
export function bashCompletion<C>(commands: readonly CommandSpec<C>[]): string {
  const prefixes = new Set<string>([""]);
  for (const c of commands) for (let i = 1; i <= c.path.length; i++) prefixes.add(c.path.slice(0, i).join(" "));
  const cases = [...prefixes].map((prefix) => {
    const path = prefix === "" ? [] : prefix.split(" ");
    const exact = commands.find((c) => c.path.join(" ") === prefix);
    const words = [...childrenOf(commands, path), ...(exact ? flagWords(exact) : [])];
    return `    "${prefix}") opts="${words.join(" ")}" ;;`;
  });
  const known = [...prefixes].filter((p) => p !== "").join("|");
  return `# tml completion for bash. Load it with:  source <(tml completion bash)
_tml() {
  local cur="\${COMP_WORDS[COMP_CWORD]}" path="" opts="" w i candidate
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="\${COMP_WORDS[i]}"
    [[ "$w" == -* ]] && continue
    candidate="\${path:+$path }$w"
    case "|${known}|" in
      *"|$candidate|"*) path="$candidate" ;;
    esac
  done
  case "$path" in
${cases.join("\n")}
  esac
  case "\${COMP_WORDS[COMP_CWORD-1]}" in
    -o|--output) opts="table json yaml" ;;
  esac
  COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
}
complete -o default -F _tml tml
`;
}

/** A zsh completion script: the bash one through bashcompinit. */
export function zshCompletion<C>(commands: readonly CommandSpec<C>[]): string {
  return `# tml completion for zsh. Load it with:  source <(tml completion zsh)
autoload -U +X compinit && compinit
autoload -U +X bashcompinit && bashcompinit
${bashCompletion(commands).split("\n").slice(1).join("\n")}`;
}
