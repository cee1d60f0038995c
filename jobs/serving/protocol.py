"""The OpenAI chat-completions request, validated (docs/serving.md#api): pydantic models that refuse unknown
fields, and the decoding of `data:` image URLs. A bad request becomes one RequestError naming the field, which
the server answers with a 4xx and a JSON error body."""
from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from datasets_catalog.plan import Message
from pipelines.imaging.decode import ImageDecodeError, load_image_rgb

MAX_IMAGE_BYTES = 20 * 1024 * 1024          # decoded size of one data URL image
MAX_IMAGE_PIXELS = 64 * 1024 * 1024         # width * height of one image (decompression bombs)
DEFAULT_MAX_TOKENS = 512                    # jobs/vqa.py's --max_new_tokens default
DEFAULT_SEED = 42                           # jobs/vqa.py's --seed default
DATA_URL = re.compile(r"^data:(?P<mime>image/[A-Za-z0-9.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.S)
ROLES = {"user": "human", "assistant": "gpt", "system": "human"}


class RequestError(ValueError):
    """A bad request: `status` (400, 404, 413 ...) and a message naming the field and what to do."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class ImageGenerationOptions(_Strict):
    """The `image_generation` extension: the last user message is the instruction (its image, if any, is edited);
    the reply carries a base64 PNG. Defaults are jobs/generate.py's."""
    cfg_text_scale: float = Field(4.0, ge=0)
    cfg_img_scale: float = Field(2.0, ge=0)
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    cfg_renorm_type: Literal["global", "channel", "text_channel"] = "text_channel"
    cfg_renorm_min: float = Field(0.0, ge=0)
    num_timesteps: int = Field(50, ge=1, le=1000)
    timestep_shift: float = Field(3.0, gt=0)
    think: bool = False
    understanding: Literal["append", "turn", "none"] = "append"
    size: str | None = Field(None, pattern=r"^\d+x\d+$", description="HEIGHTxWIDTH, multiples of 16")


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1
    user: str | None = None
    image_generation: ImageGenerationOptions | None = None


@dataclass
class ChatJob:
    """What the model is asked: images (in order of appearance), the conversation, decoding options."""
    images: list[Image.Image]
    messages: list[Message]
    max_tokens: int
    do_sample: bool
    temperature: float
    seed: int
    stream: bool
    image_generation: ImageGenerationOptions | None = None
    image_size: tuple[int, int] | None = field(default=None)


def _where(loc: tuple[Any, ...]) -> str:
    """pydantic's error location -> 'messages[0].content[1].image_url.url': union branch names ('str',
    'list[...]') and the tag pydantic inserts after a content part's index are dropped."""
    parts = [p for p in loc if not (isinstance(p, str) and (p == "str" or "[" in p))]
    out = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i >= 2 and isinstance(parts[i - 1], int) and parts[i - 2] == "content" and part in ("text", "image_url"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_message(exc: ValidationError) -> tuple[str, str]:
    """The most specific problem as 'FIELD: what is wrong' plus the field, e.g. ('messages[0].role: ...',
    'messages[0].role')."""
    err = max(exc.errors(), key=lambda e: len(e["loc"]))
    where = _where(tuple(err["loc"])) or "body"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown field; remove it (docs/serving.md#api lists the fields)", where
    if err["type"] == "missing":
        return f"{where}: required field is missing", where
    return f"{where}: {err['msg']}", where


def decode_image_url(url: str, where: str) -> Image.Image:
    """A `data:image/...;base64,...` URL -> RGB image. Remote URLs are refused: the server fetches nothing."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        raise RequestError(f"{where}: {url.split('://')[0]}:// image URLs are refused: the server fetches nothing "
                           f"from the network; send the image inline as data:image/png;base64,...", param=where)
    m = DATA_URL.match(url)
    if not m:
        raise RequestError(f"{where}: expected a data:image/...;base64,... URL", param=where)
    data = m.group("data")
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise RequestError(f"{where}: image larger than {MAX_IMAGE_BYTES // 2**20} MiB", status=413, param=where)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the base64 data is broken", param=where) from None
    try:
        with Image.open(io.BytesIO(raw)) as img:        # the header only: refuse huge images before decoding
            width, height = img.size
    except Exception:  # not a PIL format (DICOM, NIfTI) or broken: the shared decoder below says which
        width = height = 0
    if width * height > MAX_IMAGE_PIXELS:
        raise RequestError(f"{where}: image of {width}x{height} pixels is too large (at most {MAX_IMAGE_PIXELS} "
                           f"pixels)", status=413, param=where)
    try:
        return load_image_rgb(raw, None)      # the decoder jobs/vqa.py reads files with (DICOM, 16-bit PNG ...)
    except ImageDecodeError as exc:
        raise RequestError(f"{where}: cannot decode the image ({exc}); send a PNG, JPEG or DICOM",
                           param=where) from None
    except Exception as exc:  # a decoder tripping over hostile bytes is still the request's fault
        raise RequestError(f"{where}: cannot decode the image ({type(exc).__name__}: {exc}); send a PNG, JPEG "
                           f"or DICOM", param=where) from None


def parse_chat_request(body: Any, served_model: str, max_tokens_limit: int) -> ChatJob:
    """A JSON body -> ChatJob, or RequestError. temperature 0 means greedy (argmax) decoding."""
    if not isinstance(body, dict):
        raise RequestError("body: expected a JSON object")
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        message, where = validation_message(exc)
        raise RequestError(message, param=where) from None
    if req.model != served_model:
        raise RequestError(f"model: {req.model!r} is not served here; GET /v1/models lists {served_model!r}",
                           status=404, param="model")
    if req.messages[-1].role != "user":
        raise RequestError(f"messages[{len(req.messages) - 1}].role: the last message must be the user's",
                           param="messages")
    images: list[Image.Image] = []
    messages: list[Message] = []
    for i, msg in enumerate(req.messages):
        texts: list[str] = []
        if isinstance(msg.content, str):
            texts.append(msg.content)
        else:
            for j, part in enumerate(msg.content):
                if isinstance(part, TextPart):
                    texts.append(part.text)
                else:
                    if msg.role != "user":
                        raise RequestError(f"messages[{i}].content[{j}]: images are accepted in user messages only",
                                           param=f"messages[{i}].content[{j}]")
                    images.append(decode_image_url(part.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
        messages.append(Message(ROLES[msg.role], "\n".join(texts)))
    if not messages[-1].value.strip() and not images:
        raise RequestError(f"messages[{len(messages) - 1}].content: empty question", param="messages")
    max_tokens = req.max_completion_tokens or req.max_tokens or min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    if max_tokens > max_tokens_limit:
        raise RequestError(f"max_tokens: {max_tokens} is above this server's limit of {max_tokens_limit} "
                           f"(--max_tokens_limit)", param="max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    size = None
    if req.image_generation is not None:
        if len(images) > 1:
            raise RequestError("image_generation: at most one input image (the one to edit)",
                               param="image_generation")
        if req.stream:
            raise RequestError("stream: not supported with image_generation", param="stream")
        if req.image_generation.size:
            h, w = (int(v) for v in req.image_generation.size.split("x"))
            size = (h, w)
    return ChatJob(images, messages, max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                   seed=DEFAULT_SEED if req.seed is None else req.seed, stream=req.stream,
                   image_generation=req.image_generation, image_size=size)
