/**
 * `defineCommand`: a tml command whose `run` gets its arguments and flags
 * typed by its own specs (lib/config.ts's field specs): a required argument
 * is a string, an optional one may be undefined, a bool flag is a boolean, a
 * list flag an array, a flag with choices their union. Each verb group
 * (cli/commands/*.ts) defines its commands with it.
 */
import { inputOf, type ArgSpec, type CommandSpec, type FlagSchema, type Input } from "./args.js";
import type { CliContext } from "./context.js";

export type Command = CommandSpec<CliContext>;

export interface CommandDefinition<A extends readonly ArgSpec[], F extends FlagSchema> {
  /** Words after `tml`, e.g. ["job", "run"]. */
  readonly path: readonly string[];
  readonly summary: string;
  readonly description?: string;
  readonly args?: A;
  readonly flags?: F;
  readonly examples?: readonly string[];
  run(ctx: CliContext, input: Input<A, F>): Promise<number>;
}

export function defineCommand<const A extends readonly ArgSpec[] = [], const F extends FlagSchema = Record<never, never>>(definition: CommandDefinition<A, F>): Command {
  return { ...definition, run: (ctx, parsed) => definition.run(ctx, inputOf<A, F>(parsed)) };
}
