/**
 * Follows one channel of one job attempt on the job's log servers
 * (LogService.Read with `follow`), with a log:read token from
 * JobService.GetJobLogAccess. A broken stream is reopened from the next seq,
 * on the next log server, with backoff; an expired token is renewed. Ends
 * when the channel is closed (the job's end), or on abort.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { LogService, ReadEndReason } from "../../gen/treadmill/log/v1/log_service_pb.js";
import { keepStreaming } from "../../lib/retry.js";
import type { Api } from "./api.js";

export interface FollowOptions {
  jobId: string;
  attempt: number;
  channel: string;
  signal: AbortSignal;
  onData: (bytes: Uint8Array) => void;
  /** Connection news for the status line: "live", "reconnecting", "ended". */
  onStatus: (status: "live" | "reconnecting" | "ended", detail?: string) => void;
}

/** Resolves when the channel ended or the signal aborted; rejects on a refusal that retrying cannot fix. */
export async function followChannel(api: Api, options: FollowOptions): Promise<void> {
  const { jobId, attempt, channel, signal } = options;
  const jobs = api.client(JobService);
  let token = "";
  let urls: string[] = [];
  let nextSeq = 1n;
  let server = 0;
  let renewed = false;
  let ended = false;
  await keepStreaming({
    open: async (stream) => {
      if (urls.length === 0 || renewed) {
        const access = await jobs.getJobLogAccess({ jobId }, { signal, timeoutMs: 15_000 });
        urls = access.logServerUrls;
        token = access.readToken?.token ?? "";
        if (urls.length === 0) throw new ConnectError("the job has no log servers", Code.FailedPrecondition);
      }
      const url = urls[server % urls.length];
      const logs = api.remote(LogService, url, () => token);
      const messages = logs.read({ jobId, attempt, channel, start: { case: "fromSeq", value: nextSeq }, follow: true }, { signal });
      let announced = false;
      for await (const message of messages) {
        if (!announced) {
          options.onStatus("live");
          announced = true;
          stream.healthy();
        }
        renewed = false;
        if (message.payload.case === "frame") {
          nextSeq = message.payload.value.seq + 1n;
          options.onData(message.payload.value.data);
        } else if (message.payload.case === "end" && message.payload.value.reason !== ReadEndReason.UNSPECIFIED) {
          options.onStatus("ended", endText(message.payload.value.reason));
          ended = true;
          return;
        }
      }
    },
    backoff: { initialMs: 250, maxMs: 5000 },
    signal,
    onEnd() {
      if (ended) return "stop";
      // The stream ended without an `end`: the server went away; reopen.
      options.onStatus("reconnecting", "the log server closed the stream");
    },
    onError(err, { verdict }) {
      const error = ConnectError.from(err);
      if ((error.code === Code.Unauthenticated || error.code === Code.PermissionDenied) && !renewed && urls.length > 0) {
        renewed = true; // the read token expired: ask for a new one, once per failure
        return { retryInMs: 0 };
      }
      if (verdict === "permanent") return "stop";
      server++;
      options.onStatus("reconnecting", error.rawMessage);
      return "retry";
    },
  }).catch((err: unknown) => {
    throw ConnectError.from(err);
  });
}

function endText(reason: ReadEndReason): string {
  switch (reason) {
    case ReadEndReason.CHANNEL_CLOSED:
      return "end of log";
    case ReadEndReason.SIZE_CAP:
      return "the log reached its size cap";
    case ReadEndReason.DELETED:
      return "the log was deleted";
    default:
      return "end of data";
  }
}
