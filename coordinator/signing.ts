import type { Sql, TransactionSql } from "postgres";
import type { Logger } from "../lib/logger.js";
import { generateSigningKey, type Capability, type JWK, TokenSigner } from "../lib/tokens.js";

/** How long a retired key stays published, so tokens it signed still verify. */
const PUBLISH_RETIRED_MS = 24 * 60 * 60 * 1000;

/** Advisory lock key so that two replicas starting together create one key. */
const KEY_CREATION_LOCK = 7_351_002;

interface KeyRow {
  kid: string;
  private_jwk: JWK;
  public_jwk: JWK;
  retired_at: Date | null;
}

/**
 * The coordinator's capability-token keys (DESIGN.md §3). They persist in
 * `signing_keys`; the newest unretired one signs, and every key that is live
 * or was retired less than a day ago is published by GetSigningKeys, so a
 * rotation never invalidates a token in flight. Replicas share the keys
 * through the database; `refresh()` picks up another replica's rotation.
 */
export class SigningKeys {
  private signer!: TokenSigner;
  private published: JWK[] = [];

  private constructor(
    private readonly sql: Sql,
    readonly issuer: string,
    private readonly clock: () => number,
    private readonly logger: Logger,
  ) {}

  /** Loads the keys, creating the first one if there is none. */
  static async load(sql: Sql, options: { issuer: string; logger: Logger; clock?: () => number }): Promise<SigningKeys> {
    const keys = new SigningKeys(sql, options.issuer, options.clock ?? Date.now, options.logger);
    await sql.begin(async (tx) => {
      await tx`select pg_advisory_xact_lock(${KEY_CREATION_LOCK})`;
      const [live] = await tx`select kid from signing_keys where retired_at is null limit 1`;
      if (!live) await keys.insertNew(tx);
    });
    await keys.refresh();
    return keys;
  }

  /** Re-reads the keys from the database (another replica may have rotated). */
  async refresh(): Promise<void> {
    const since = new Date(this.clock() - PUBLISH_RETIRED_MS);
    const rows = await this.sql<KeyRow[]>`
      select kid, private_jwk, public_jwk, retired_at from signing_keys
      where retired_at is null or retired_at > ${since}
      order by created_at desc, kid`;
    const active = rows.find((r) => r.retired_at === null);
    if (!active) throw new Error("no active signing key");
    if (this.signer?.kid !== active.kid) {
      this.signer = await TokenSigner.create({ kid: active.kid, privateJwk: active.private_jwk }, { issuer: this.issuer, clock: this.clock });
    }
    this.published = rows.map((r) => r.public_jwk);
  }

  /** Makes a new key the signing key and retires the others (still published for a day). */
  async rotate(): Promise<string> {
    const kid = await this.sql.begin(async (tx) => {
      await tx`select pg_advisory_xact_lock(${KEY_CREATION_LOCK})`;
      await tx`update signing_keys set retired_at = ${new Date(this.clock())} where retired_at is null`;
      return this.insertNew(tx);
    });
    await this.refresh();
    this.logger.info({ kid }, "signing key rotated");
    return kid;
  }

  /** Mints a capability token (see lib/tokens.ts). */
  sign(capability: Capability, ttlMs: number, to: { subject: string; audience?: string | string[] }): Promise<string> {
    return this.signer.sign(capability, ttlMs, to);
  }

  /** The published public keys, for GetSigningKeys and in-process verifiers. */
  jwks(): { keys: JWK[] } {
    return { keys: [...this.published] };
  }

  private async insertNew(tx: TransactionSql): Promise<string> {
    const key = await generateSigningKey();
    await tx`
      insert into signing_keys (kid, private_jwk, public_jwk, created_at)
      values (${key.kid}, ${tx.json(key.privateJwk as never)}, ${tx.json(key.publicJwk as never)}, ${new Date(this.clock())})
      on conflict (kid) do nothing`;
    return key.kid;
  }
}
