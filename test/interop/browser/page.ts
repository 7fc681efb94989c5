// The page the browser interop test loads: calls a coordinator from Chromium
// with connect-web, over the Connect protocol and over gRPC-Web, and leaves
// what it saw on `window.treadmillResult` for the test to read.
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import { Health } from "../../../gen/grpc/health/v1/health_pb.js";
import { JobService } from "../../../gen/treadmill/coordinator/v1/job_service_pb.js";

type Outcome = { health?: number; getJob?: string; error?: string };

async function probe(transport: Transport): Promise<Outcome> {
  try {
    const health = await createClient(Health, transport).check({ service: "" });
    let getJob: string;
    try {
      await createClient(JobService, transport).getJob({ jobId: "0190d3c6-0000-7000-8000-000000000000" });
      getJob = "OK";
    } catch (err) {
      getJob = Code[ConnectError.from(err).code];
    }
    return { health: health.status, getJob };
  } catch (err) {
    return { error: `${Code[ConnectError.from(err).code]}: ${ConnectError.from(err).rawMessage}` };
  }
}

async function main() {
  const baseUrl = new URL(location.href).searchParams.get("server") ?? "";
  const result = {
    connect: await probe(createConnectTransport({ baseUrl })),
    grpcWeb: await probe(createGrpcWebTransport({ baseUrl })),
  };
  (window as unknown as { treadmillResult: unknown }).treadmillResult = result;
  document.body.textContent = JSON.stringify(result);
}

void main();
