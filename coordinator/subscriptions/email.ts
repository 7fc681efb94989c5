/**
 * Email deliveries through the configured SMTP server (nodemailer, MIT-0):
 * one message per event, or one per digest window with every event of the
 * window. The message's text is the event in a line for people and its
 * JSON body; its headers carry the same event and delivery ids as a
 * webhook's.
 */
import nodemailer from "nodemailer";
import type { Transporter } from "nodemailer";

/** One event of a message. */
export interface MailEvent {
  eventId: string;
  kind: string;
  body: string;
}

/** A line for people about one event body. */
export function describeEvent(kind: string, body: string): string {
  let p: Record<string, unknown> = {};
  try {
    p = JSON.parse(body) as Record<string, unknown>;
  } catch {
    // A body is always JSON; say little if not.
  }
  const subject = p.job_id ? `job ${String(p.job_id)}` : p.host_name ? `host ${String(p.host_name)}` : p.lease_id ? `lease ${String(p.lease_id)}` : "";
  const what = [p.state ?? p.health, p.reason, p.exit_status].filter((x) => typeof x === "string" && x !== "").join(" ");
  return [kind, subject, what].filter((x) => x !== "").join(": ");
}

export class Mailer {
  private readonly transport: Transporter;

  constructor(
    url: string,
    private readonly from: string,
  ) {
    this.transport = nodemailer.createTransport(url);
  }

  /** Sends one message for `events` (one: a message per event; several: a digest). Rejects on an SMTP error. */
  async send(to: string[], subscription: { id: string; name: string }, deliveryIds: string[], events: MailEvent[]): Promise<void> {
    const one = events.length === 1;
    const subject = one
      ? `[treadmill] ${subscription.name}: ${describeEvent(events[0].kind, events[0].body)}`
      : `[treadmill] ${subscription.name}: ${events.length} events`;
    const text = events.map((e) => `${describeEvent(e.kind, e.body)}\nevent ${e.eventId}\n${e.body}\n`).join("\n");
    await this.transport.sendMail({
      from: this.from,
      to,
      subject: subject.slice(0, 200),
      text,
      headers: {
        "X-Treadmill-Subscription-Id": subscription.id,
        "X-Treadmill-Event-Id": events.map((e) => e.eventId).join(", "),
        "X-Treadmill-Delivery-Id": deliveryIds.join(", "),
      },
    });
  }

  close(): void {
    this.transport.close();
  }
}
