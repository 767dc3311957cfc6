"""moto's S3-compatible server with the buckets of S3_BUCKETS (comma-separated) made at start, so
that the bots' start-up probe finds them; S3_PORT (9000) on every interface. Runs until SIGTERM.

A stand-in for a real store (deploy/s3/Containerfile says why and what not to use it for).
"""

import os
import signal

import boto3
from moto.server import ThreadedMotoServer


def main() -> None:
    # Blocked before the server's threads start, so that they inherit the mask and the main
    # thread alone takes the signal in sigwait.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    port = int(os.environ.get("S3_PORT", "9000"))
    server = ThreadedMotoServer(ip_address="0.0.0.0", port=port, verbose=False)
    server.start()
    # moto checks no credentials (its IAM authentication is off by default): any pair signs.
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="moto",
        aws_secret_access_key="moto",
    )
    buckets = [b.strip() for b in os.environ.get("S3_BUCKETS", "imagine-images").split(",") if b.strip()]
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    print(f"moto S3 on 0.0.0.0:{port}, buckets: {', '.join(buckets)} (in memory)", flush=True)
    received = signal.sigwait(stop_signals)
    print(f"{signal.Signals(received).name}: stopping", flush=True)
    server.stop()


if __name__ == "__main__":
    main()
