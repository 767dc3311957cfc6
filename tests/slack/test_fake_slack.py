"""The fake Slack itself behaves like Slack for the real slack_sdk client (so adapter tests mean something)."""

from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from tests.slack.fake_slack import BOT_TOKEN, FakeSlack


async def test_upload_v2_shares_file_visible_in_files_info():
    async with FakeSlack() as fake:
        client = AsyncWebClient(token=BOT_TOKEN, base_url=fake.api_url)
        resp = await client.files_upload_v2(
            channel="CGENERAL1", content=b"\x89PNG fake", filename="a.png", title="a", initial_comment="hello"
        )
        file_id = resp["file"]["id"]
        assert "shares" not in resp["file"]  # like Slack: sharing is reported later, by files.info
        info = await client.files_info(file=file_id)
        ts = info["file"]["shares"]["public"]["CGENERAL1"][0]["ts"]
        assert fake.messages[("CGENERAL1", ts)].text == "hello"
        assert fake.files[file_id].data == b"\x89PNG fake"
        # parameters arrived through the query string, JSON and form bodies alike
        assert fake.calls_to("files.getUploadURLExternal")[0].params["filename"] == "a.png"


async def test_wrong_token_and_429_like_slack():
    async with FakeSlack() as fake:
        bad = AsyncWebClient(token="xoxb-wrong", base_url=fake.api_url)
        try:
            await bad.auth_test()
            raise AssertionError("expected invalid_auth")
        except SlackApiError as e:
            assert e.response["error"] == "invalid_auth"
        client = AsyncWebClient(token=BOT_TOKEN, base_url=fake.api_url)
        client.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=2))
        fake.rate_limit("chat.postMessage", times=1, retry_after=0)
        resp = await client.chat_postMessage(channel="CGENERAL1", text="hi")
        assert resp["ok"] and [c.status for c in fake.calls if c.method == "chat.postMessage"] == [429, 200]
